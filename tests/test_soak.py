"""Soak: 500 ADD/DEL cycles through the agent, in batches, with a failure injected into
every 7th ADD, and a mix of plain, subnet-split (HTB + LPM) and mirred attachments.
Nothing may leak (ifb, qdisc, filter, map or trie entry, pin) and the agent's memory
must stay flat. A longer soak is a matter of BWPLUGIN_SOAK_CYCLES."""

from __future__ import annotations

import os

import pytest

from bench.lab.lab import Lab
from bench.lab.libcni import PluginFailed
from bwplugin.datapath import bpf

from .conftest import bandwidth, shaper
from .oracle import attach_count, lpm_ids, settled_ifbs, view

pytestmark = pytest.mark.kernel
CYCLES = int(os.environ.get("BWPLUGIN_SOAK_CYCLES", "500"))
BATCH = 10


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def test_soak_add_del_cycles_leak_nothing() -> None:
    with Lab(agent=True) as lab:
        conflists = [
            lab.conflist(shaper()),
            lab.conflist(shaper(unshapedSubnets=["10.96.0.0/12", "fd00:96::/64"])),
            lab.conflist(shaper(egressRedirect="mirred")),
        ]
        bpf.programs().close()  # compiled and pinned before the baseline is taken
        before = attach_count()
        pins = sorted(os.listdir(os.environ["BWPLUGIN_PIN_DIR"]))
        lpm = bpf.open_lpm()
        assert lpm is not None
        lpm_before = len(lpm_ids(lpm))
        rss: list[int] = []
        fds: list[int] = []  # open files: a leaked program or map fd per ADD would show
        faults = 0
        for batch in range(CYCLES // BATCH):
            pods = [lab.pod(f"s{batch}-{i}") for i in range(BATCH)]
            for i, pod in enumerate(pods):
                n = batch * BATCH + i
                conflist = conflists[n % 3]
                if n % 7 == 3:
                    lab.set_fault("after-map")
                    with pytest.raises(PluginFailed):
                        lab.attach(pod, conflist, bandwidth(ingress=5_000_000 + n, egress=5_000_000 + n))
                    lab.set_fault(None)
                    faults += 1
                else:
                    lab.attach(pod, conflist, bandwidth(ingress=5_000_000 + n, egress=5_000_000 + n)).check()
            for pod in pods:
                lab.remove_pod(pod)  # DEL (also after the failed ADDs), then the netns goes
            assert lab.agent is not None
            rss.append(rss_kib(lab.agent.pid))
            fds.append(len(os.listdir(f"/proc/{lab.agent.pid}/fd")))
        assert faults >= CYCLES // 7
        assert settled_ifbs(lab.node) == []
        kv = view(lab.node)
        assert not any(kv.has_clsact(n) or kv.root(n) and kv.root(n)["kind"] != "noqueue" for n in kv.links)
        assert attach_count() == before
        assert len(lpm_ids(lpm)) == lpm_before
        assert sorted(os.listdir(os.environ["BWPLUGIN_PIN_DIR"])) == pins
        # flat memory: after warm-up (first batches) the agent grows by less than 4 MiB
        warm = rss[min(2, len(rss) - 1)]
        assert rss[-1] - warm < 4096, rss
        assert fds[-1] <= fds[0] + 2, fds
        print(f"soak: {CYCLES} cycles, {faults} injected faults, agent RSS KiB {rss[0]} -> {rss[-1]}")
