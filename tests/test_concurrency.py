"""32 ADDs, then 32 CHECKs, then 32 DELs at once, twice, a quarter of them with\nsubnets: no lost or crossed state.
Plugin processes are started with nsenter (no preexec_fn: not safe with threads)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from bench.lab.lab import Lab, Pod
from bench.lab.libcni import plugin_conf
from bwplugin.datapath import bpf

from .conftest import bandwidth, shaper
from .oracle import attach_count, lpm_ids, settled_ifbs, view

pytestmark = pytest.mark.kernel
PARALLEL = 32
ROUNDS = 2  # x 3 commands x 32 x 2 paths: 384 plugin runs, 32 at a time


def spawn(lab: Lab, command: str, pod: Pod, conf: dict[str, Any]) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"{pod.name}-cid",
        "CNI_NETNS": pod.netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(lab.bin_dir),
        **lab.runtime.extra_env,
    }
    proc = subprocess.Popen(
        ["nsenter", f"--net={lab.node}", str(lab.bin_dir / "bwplugin")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    return proc


def run_all(lab: Lab, command: str, pods: list[Pod], confs: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    procs = [spawn(lab, command, pod, conf) for pod, conf in zip(pods, confs, strict=True)]
    out = []
    for proc in procs:
        assert proc.stdout is not None and proc.stderr is not None
        stdout = proc.stdout.read()
        proc.stderr.read()
        out.append((proc.wait(timeout=120), stdout))
    return out


def subnet_of(i: int) -> list[str] | None:
    """Every 4th pod splits its traffic by subnet, each with its own prefixes."""
    return [f"10.{100 + i}.0.0/16", f"fd00:{100 + i:x}::/64"] if i % 4 == 0 else None


@pytest.mark.parametrize("rnd", range(ROUNDS))
def test_parallel_add_check_del(lab: Lab, rnd: int) -> None:
    ptp_only = lab.conflist(None)
    pods = [lab.pod(f"c{i}") for i in range(PARALLEL)]
    for pod in pods:
        lab.attach(pod, ptp_only)  # ptp ADD, sequentially
    rates = [(1 + i + rnd) * 1_000_000 for i in range(PARALLEL)]  # every pod different: crossed state would show
    confs = []
    for i, (pod, rate) in enumerate(zip(pods, rates, strict=True)):
        static = {"unshapedSubnets": subnet_of(i)} if subnet_of(i) else {}
        confs.append(
            plugin_conf(ptp_only, shaper(**static), pod.attachment.result, bandwidth(ingress=rate, egress=2 * rate))
        )
    before = attach_count()

    added = run_all(lab, "ADD", pods, confs)
    assert all(rc == 0 for rc, _ in added), [o for rc, o in added if rc]
    results = [json.loads(out) for _, out in added]
    kv = view(lab.node)
    fd, lpm = bpf.open_map(), bpf.open_lpm()
    entries = bpf.attach_entries(fd)
    for i, (pod, result, rate) in enumerate(zip(pods, results, rates, strict=True)):
        veth = next(x["name"] for x in result["interfaces"] if x["name"].startswith("veth"))
        ifb = result["interfaces"][-1]["name"]
        kind = "htb" if subnet_of(i) else "tbf"
        assert kv.root(veth)["kind"] == kind and kv.root(ifb)["kind"] == kind, pod.name
        if kind == "tbf":
            assert kv.tbf(veth)["rate"] == rate // 8, pod.name
            assert kv.tbf(ifb)["rate"] == 2 * rate // 8, pod.name
        else:
            assert kv.leaf_tbf(veth)["rate"] == rate // 8, pod.name  # the HTB only sorts: its TBF leaf shapes
            assert kv.leaf_tbf(ifb)["rate"] == 2 * rate // 8, pod.name
        (attach_id,) = {f["classid"] for f in kv.filters.get(veth, []) + kv.out_filters.get(veth, [])}
        assert entries[attach_id].container_id == f"{pod.name}-cid"
        assert sorted(map(str, bpf.subnets_of(lpm, attach_id))) == sorted(subnet_of(i) or []), pod.name
    ids = [f[0]["classid"] for f in kv.filters.values()]
    assert len(ids) == PARALLEL and len(set(ids)) == PARALLEL  # no id handed out twice

    checks = run_all(lab, "CHECK", pods, [{**c, "prevResult": r} for c, r in zip(confs, results, strict=True)])
    assert all(rc == 0 for rc, _ in checks), [o for rc, o in checks if rc]

    deleted = run_all(lab, "DEL", pods, [{**c, "prevResult": r} for c, r in zip(confs, results, strict=True)])
    assert all(rc == 0 for rc, _ in deleted), [o for rc, o in deleted if rc]
    assert settled_ifbs(lab.node) == []
    kv = view(lab.node)
    assert not any(kv.has_clsact(n) or kv.root(n)["kind"] != "noqueue" for n in kv.links if kv.root(n))
    assert attach_count() == before
    assert not set(ids) & lpm_ids(lpm)
    os.close(fd)
    os.close(lpm)
