"""bwplugin beside other tc users of a pod's host veth: another tool's clsact,
its u32 and eBPF filters on both hooks, put there before bwplugin's ADD (while
the runtime works down the chain) or after it. Each keeps seeing the pod's
packets, bwplugin still holds the rate both ways, CHECK passes, and bwplugin's
DEL leaves the other tool's objects in place and working.

This kernel has no gact, so the foreign u32 filter's `continue` is carried by a
mirred mirror action (to a sink veth of the test's own); the foreign eBPF
program is a small counter of the test's own, in direct-action mode."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.lab.lab import Lab, Pod
from bench.lab.libcni import PluginFailed, plugin_conf
from bench.lab.measure import iperf_goodput
from bwplugin.datapath import bpf
from bwplugin.datapath.netlink import CLONE_NEWNET

from .conftest import bandwidth, host_veth, shaper
from .oracle import (
    after_handover,
    handed_over,
    kernel_has_tcx,
    link_pins,
    settled_ifbs,
    settled_tcx_chain,
    tcx_chain,
    view,
)

pytestmark = pytest.mark.kernel
RATE = 10_000_000
HOOKS = ("ingress", "egress")  # tc's names for the clsact hooks: from the pod, to the pod
FOREIGN_PRIO = 49152  # what tc picks for a filter added without a priority
# u32 filters of one priority on both hooks of a clsact share their hash tables,
# and the kernel lists each hook's under both: give each hook its own priority
U32_PRIO = {"ingress": 1, "egress": 2}

FOREIGN_C = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(hits, u64, 4);  // packets seen: [0] clsact ingress, [1] clsact egress, [2] TCX ingress, [3] TCX egress

static __always_inline int seen(int hook)
{
    u64 *n = hits.lookup(&hook);
    if (n)
        __sync_fetch_and_add(n, 1);
    return TC_ACT_UNSPEC;  // continue: the next filter runs
}
int foreign_ingress(struct __sk_buff *skb) { return seen(0); }
int foreign_egress(struct __sk_buff *skb) { return seen(1); }
int foreign_tcx_ingress(struct __sk_buff *skb) { return seen(2); }  // TCX_NEXT
int foreign_tcx_egress(struct __sk_buff *skb) { return seen(3); }
"""


class ForeignProgram:
    """Another tool's eBPF counter, pinned so that tc(8) can attach it."""

    def __init__(self) -> None:
        from bcc import BPF, libbcc

        self.dir = Path(f"/sys/fs/bpf/bwpt-foreign-{os.getpid()}")
        self.dir.mkdir(exist_ok=True)
        self.bcc = BPF(text=FOREIGN_C.encode())
        self.pins, self.fds = {}, {}
        for name in (*HOOKS, "tcx_ingress", "tcx_egress"):
            fn = self.bcc.load_func(f"foreign_{name}".encode(), BPF.SCHED_CLS)
            path = self.dir / name
            path.unlink(missing_ok=True)
            assert libbcc.lib.bpf_obj_pin(fn.fd, str(path).encode()) == 0, f"pinning {path}"
            self.pins[name], self.fds[name] = path, fn.fd

    def hits(self, name: str) -> int:
        return int(self.bcc[b"hits"][ctypes.c_int((*HOOKS, "tcx_ingress", "tcx_egress").index(name))].value)

    def close(self) -> None:
        for path in self.pins.values():
            path.unlink(missing_ok=True)
        self.dir.rmdir()
        self.bcc.cleanup()


@pytest.fixture(scope="module")
def foreign_prog() -> Iterator[ForeignProgram]:
    prog = ForeignProgram()
    try:
        yield prog
    finally:
        prog.close()


class ForeignTool:
    """What another tool puts on the veth: a u32 filter before bwplugin's (prio 1, 2)
    and an eBPF filter after bwplugin's counting one (tc's default priority), on
    both hooks; the clsact too, if there is none yet."""

    def __init__(self, lab: Lab, veth: str, prog: ForeignProgram, tcx: bool = False) -> None:
        self.lab, self.veth, self.prog, self.tcx = lab, veth, prog, tcx
        self.sink = f"bwpt-sk{os.getpid() % 10000}"
        self.counters = [*HOOKS, *(("tcx_ingress", "tcx_egress") if tcx else ())]
        self.base = {name: prog.hits(name) for name in self.counters}
        self.made_clsact = False
        self.links: list[Path] = []

    def tc(self, *args: str) -> str:
        return self.lab.run(self.lab.node, "tc", *args).stdout

    def install(self) -> None:
        self.lab.run(self.lab.node, "ip", "link", "add", self.sink, "type", "veth", "peer", "name", self.sink + "p")
        self.lab.run(self.lab.node, "ip", "link", "set", self.sink, "up")
        if "clsact" not in self.tc("qdisc", "show", "dev", self.veth):
            self.tc("qdisc", "add", "dev", self.veth, "clsact")
            self.made_clsact = True
        for hook in HOOKS:
            mirror = ("action", "mirred", "egress", "mirror", "dev", self.sink, "continue")
            self.tc("filter", "add", "dev", self.veth, hook, "prio", str(U32_PRIO[hook]), "protocol", "all", "u32",
                    "match", "u32", "0", "0", *mirror)  # fmt: skip
            self.tc("filter", "add", "dev", self.veth, hook, "prio", str(FOREIGN_PRIO), "handle", "1",
                    "bpf", "da", "object-pinned", str(self.prog.pins[hook]))  # fmt: skip
            if self.tcx:  # a TCX tool appends its program (no BPF_F_BEFORE)
                self.links.append(tcx_attach(self.lab.node, self.veth, self.prog, hook, 0))

    def remove(self) -> None:
        for path in self.links:
            path.unlink(missing_ok=True)  # the last reference: the link detaches
        self.lab.run(self.lab.node, "sh", "-c", f"ip link del {self.sink} 2>/dev/null || true")

    def filters(self, hook: str) -> list[dict]:
        return [f for f in json.loads(self.tc("-s", "-j", "filter", "show", "dev", self.veth, hook)) if "options" in f]

    def kinds(self, hook: str) -> list[tuple[int, str]]:
        """(prio, kind) of every filter on the hook, bwplugin's included."""
        return sorted(
            {(f["pref"], f["kind"]) for f in self.filters(hook) if f["kind"] != "u32" or "match" in f["options"]}
        )

    def u32_packets(self, hook: str) -> int:
        u32s = [f for f in self.filters(hook) if f["kind"] == "u32" and "actions" in f["options"]]
        assert len(u32s) == 1, json.dumps(u32s)
        u32 = u32s[0]
        return int(u32["options"]["actions"][0]["stats"]["packets"])

    def seen(self) -> dict[str, tuple[int, ...]]:
        """Per hook: packets counted by the u32 filter, the eBPF filter and (tcx) the TCX program."""
        out = {}
        for hook in HOOKS:
            names = [hook] + ([f"tcx_{hook}"] if self.tcx else [])
            out[hook] = (self.u32_packets(hook), *(self.prog.hits(n) - self.base[n] for n in names))
        return out


def tcx_attach(netns: str, dev: str, prog: ForeignProgram, hook: str, flags: int) -> Path:
    """Another tool's TCX link for its program on the device, pinned beside the program."""
    out: dict[str, Any] = {}

    def run() -> None:  # setns moves only this thread
        fd = os.open(netns, os.O_RDONLY)
        try:
            assert ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) == 0
        finally:
            os.close(fd)
        attach_type = bpf.BPF_TCX_INGRESS if hook == "ingress" else bpf.BPF_TCX_EGRESS
        link = bpf.link_create(prog.fds[f"tcx_{hook}"], socket.if_nametoindex(dev), attach_type, flags)
        path = prog.dir / f"link_{dev}_{hook}_{flags}"
        path.unlink(missing_ok=True)
        bpf.obj_pin(link, path)
        os.close(link)
        out["path"] = path

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return Path(out["path"])


def our_offered(lab: Lab, container_id: str) -> dict[str, int]:
    """Packets bwplugin's counters saw, per tc hook (`bwplugin stats --json`)."""
    out = lab.run(lab.node, str(lab.bin_dir / "bwplugin"), "stats", "--json").stdout  # BWPLUGIN_PIN_DIR: inherited
    (row,) = [r for r in json.loads(out) if r["container_id"] == container_id]
    total = {d: row[d]["shaped_packets"] + row[d]["unshaped_packets"] for d in ("egress", "ingress")}
    return {
        "ingress": total["egress"],
        "egress": total["ingress"],
    }  # the pod's egress enters at the veth's ingress hook


def shaped_both_ways(lab: Lab, pod: Pod, peer: Pod) -> tuple[float, float]:
    """Receiver goodput / rate with UDP offered at twice the rate, each way."""
    out = iperf_goodput(lab.iperf(pod, peer, seconds=3, udp_rate=2 * RATE)) / RATE
    into = iperf_goodput(lab.iperf(pod, peer, seconds=3, udp_rate=2 * RATE, reverse=True)) / RATE
    return out, into


@pytest.mark.parametrize("when", ["before-add", "after-add"])
@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_foreign_filters_keep_counting_and_the_rate_holds(
    lab: Lab, foreign_prog: ForeignProgram, when: str, mode: str
) -> None:
    """tcx: bwplugin counts with TCX links, the other tool has a TCX program too;
    tc: bwplugin counts with cls_bpf filters (forced, as on a kernel before 6.6)."""
    if mode == "tcx" and not kernel_has_tcx():
        pytest.skip("this kernel has no TCX")
    conflist = lab.conflist(shaper(tcAttach=mode))
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, lab.conflist(shaper()))
    tools: list[ForeignTool] = []

    def foreign_tool_arrives(result: dict) -> None:
        tools.append(ForeignTool(lab, host_veth(pod, result), foreign_prog, tcx=mode == "tcx"))
        tools[0].install()

    try:
        if when == "before-add":  # between ptp's ADD and bwplugin's: the veth exists, bwplugin has not run
            att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE), between=foreign_tool_arrives)
        else:
            att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
            foreign_tool_arrives(att.result)
        (tool,) = tools
        veth = host_veth(pod, att.result)
        assert tool.made_clsact == (when == "before-add")  # before: bwplugin shares the other tool's clsact
        if mode == "tcx" and lab.agent is not None:
            handed_over(lab.node, veth)  # the agent's move to TCX links, after ADD answered
        # bwplugin counts first and redirects last; the other tool's filters sit around them
        if mode == "tcx":  # counting by TCX links, ahead of every clsact filter
            assert tool.kinds("ingress") == [(1, "u32"), (FOREIGN_PRIO, "bpf"), (0xFB0D, "bpf")]
            assert tool.kinds("egress") == [(2, "u32"), (FOREIGN_PRIO, "bpf")]
            for hook, ours in (("ingress", "bwp_tcx_from_pod"), ("egress", "bwp_tcx_to_pod")):
                assert tcx_chain(lab.node, veth, hook) == [ours, f"foreign_tcx_{hook}"]
        else:
            assert tool.kinds("ingress") == [(1, "u32"), (0xB0D, "bpf"), (FOREIGN_PRIO, "bpf"), (0xFB0D, "bpf")]
            assert tool.kinds("egress") == [(2, "u32"), (0xB0D, "bpf"), (FOREIGN_PRIO, "bpf")]
        att.check()

        lab.iperf_server(peer)
        ours_before, theirs_before = our_offered(lab, att.container_id), tool.seen()
        out, into = shaped_both_ways(lab, pod, peer)
        time.sleep(0.5)  # the queues drain
        ours, theirs = our_offered(lab, att.container_id), tool.seen()
        assert 0.9 < out < 1.05 and 0.9 < into < 1.05, (out, into)
        for hook in HOOKS:
            mine = ours[hook] - ours_before[hook]
            counts = [theirs[hook][i] - theirs_before[hook][i] for i in range(len(theirs[hook]))]
            assert mine > 2000, (hook, mine)  # 3 s each way of 20 Mbit/s in 1400-byte datagrams, or its acks
            # every packet on the hook passed all of them (a stray ND frame between reads aside)
            assert all(abs(n - mine) <= 3 for n in counts), (hook, mine, counts)
        att.check()

        # bwplugin's DEL leaves the other tool's clsact and filters, and they keep counting
        plugin = conflist["plugins"][-1]
        inv = lab.exec_shaper("DEL", pod, plugin_conf(conflist, plugin, att.result, att.runtime_config))
        assert (inv.rc, inv.stdout) == (0, ""), inv.stderr
        assert settled_ifbs(lab.node) == []
        kv = view(lab.node)
        assert kv.root(veth)["kind"] == "noqueue" and kv.has_clsact(veth)
        assert tool.kinds("ingress") == [(1, "u32"), (FOREIGN_PRIO, "bpf")]
        assert tool.kinds("egress") == [(2, "u32"), (FOREIGN_PRIO, "bpf")]
        assert link_pins() == []  # bwplugin's links went with its DEL
        if mode == "tcx":
            for hook in HOOKS:
                assert settled_tcx_chain(lab.node, veth, hook) == [f"foreign_tcx_{hook}"]
        before = tool.seen()
        lab.run(pod.netns, "ping", "-c", "5", "-i", "0.05", "-W", "1", peer.ip)
        after = tool.seen()
        for hook in HOOKS:
            assert all(a - b >= 5 for a, b in zip(after[hook], before[hook], strict=True)), (hook, after)
    finally:
        for tool in tools:
            tool.remove()


def test_check_fails_on_a_filter_that_can_take_the_pods_packets(lab: Lab, foreign_prog: ForeignProgram) -> None:
    conflist = lab.conflist(shaper(tcAttach="tc"))
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    att = lab.attach(pod, conflist, bandwidth(egress=RATE))
    veth = host_veth(pod, att.result)

    def tc(*args: str) -> None:
        lab.run(lab.node, "tc", *args)

    def check_fails() -> str:
        with pytest.raises(PluginFailed) as err:
            att.check()
        assert err.value.error["code"] == 102, err.value.error
        return str(err.value.error["msg"])

    # a u32 filter without actions ends classification where it matches: put after
    # bwplugin's counting filter, the pod's packets never reach the redirect
    tc("filter", "add", "dev", veth, "ingress", "prio", str(FOREIGN_PRIO), "protocol", "all", "u32",
       "match", "u32", "0", "0", "classid", "1:1")  # fmt: skip
    msg = check_fails()
    assert f"from-pod hook of {veth}: expected the pod's packets to reach bwplugin's redirect (prio 0xfb0d)" in msg
    assert f"found u32 filter prio {FOREIGN_PRIO}" in msg and "no actions" in msg
    lab.iperf_server(peer)
    assert iperf_goodput(lab.iperf(pod, peer, seconds=2, udp_rate=2 * RATE)) / RATE > 1.6  # CHECK was right
    tc("filter", "del", "dev", veth, "ingress", "prio", str(FOREIGN_PRIO))
    att.check()

    # before the counting filter, an eBPF program in direct-action mode may return
    # anything: bwplugin cannot tell that it passes packets on, so CHECK says so
    tc("filter", "add", "dev", veth, "egress", "prio", "2", "handle", "1",
       "bpf", "da", "object-pinned", str(foreign_prog.pins["egress"]))  # fmt: skip
    msg = check_fails()
    assert f"to-pod hook of {veth}: expected bwplugin's counting filter (prio 0xb0d) before any filter" in msg
    assert "found bpf filter prio 2" in msg and "direct-action" in msg
    tc("filter", "del", "dev", veth, "egress", "prio", "2")
    att.check()


def test_an_ingress_qdisc_cannot_be_shared_and_nothing_is_left(lab: Lab) -> None:
    """A plain `ingress` qdisc has no egress hook for the to-pod counter: ADD
    refuses with code 101 and leaves nothing of its own behind."""
    pod = lab.pod("a")
    veths: list[str] = []

    def ingress_qdisc(result: dict) -> None:
        veths.append(host_veth(pod, result))
        lab.run(lab.node, "tc", "qdisc", "add", "dev", veths[0], "ingress")

    with pytest.raises(PluginFailed) as err:
        lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=RATE, egress=RATE), between=ingress_qdisc)
    assert err.value.plugin == "bwplugin" and err.value.error and err.value.error["code"] == 101, err.value
    assert f"host veth {veths[0]} already has qdisc ingress at ffff:fff1" in err.value.error["msg"]
    kv = view(lab.node)
    assert settled_ifbs(lab.node) == [] and kv.root(veths[0])["kind"] == "noqueue"
    assert [q["kind"] for q in kv.qdiscs[veths[0]] if q["parent"] == 0xFFFFFFF1] == ["ingress"]  # theirs, untouched


def test_check_fails_on_a_tcx_program_ahead_of_ours(lab: Lab, foreign_prog: ForeignProgram) -> None:
    """A TCX program attached in front of bwplugin's runs before the pod's packets
    are counted and classified, and could take them: CHECK says so (102)."""
    if not kernel_has_tcx():
        pytest.skip("this kernel has no TCX")
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper(tcAttach="tcx")), bandwidth(ingress=RATE, egress=RATE))
    veth = host_veth(pod, att.result)
    after_handover(lab.node, veth, through_agent=lab.agent is not None)
    att.check()
    link = tcx_attach(lab.node, veth, foreign_prog, "egress", bpf.BPF_F_BEFORE)
    try:
        assert tcx_chain(lab.node, veth, "egress") == ["foreign_tcx_egress", "bwp_tcx_to_pod"]
        with pytest.raises(PluginFailed) as err:
            att.check()
        assert err.value.error and err.value.error["code"] == 102, err.value
        msg = err.value.error["msg"]
        assert f"TCX egress hook of {veth}: expected bwplugin's bwp_tcx_to_pod (prog id" in msg
        assert "found prog id" in msg and "(foreign_tcx_egr) before it" in msg
    finally:
        link.unlink()
    att.check()
