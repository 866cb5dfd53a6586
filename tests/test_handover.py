"""Through the node agent, ADD answers with cls_bpf counting and the agent then
moves the counting to TCX links (bwplugin/commands/handover.py): ADD does not
wait for the two RCU grace periods a TCX attach costs. Real pods, the real
agent, real traffic across the move; kernel state read with tc(8), a raw
BPF_PROG_QUERY and bpftool, counters with `bwplugin stats`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lab.lab import Lab
from bench.lab.libcni import PluginFailed
from bwplugin.datapath import bpf

from .conftest import bandwidth, host_veth, shaper
from .oracle import attach_count, handed_over, kernel_has_tcx, link_pins, tcx_chain
from .test_observability import rows_of

pytestmark = pytest.mark.kernel
RATE = 10_000_000


@pytest.fixture
def agent_lab() -> Iterator[Lab]:
    if not kernel_has_tcx():
        pytest.skip("this kernel has no TCX")
    with Lab(agent=True) as lab:
        yield lab


def filter_prios(lab: Lab, dev: str, hook: str) -> list[int]:
    out = lab.run(lab.node, "tc", "-j", "filter", "show", "dev", dev, hook).stdout
    return sorted({f["pref"] for f in json.loads(out or "[]")})


def conserved(row: dict, direction: str) -> tuple[int, int]:
    """(offered, sent + dropped + queued) in packets: UDP, so one packet per datagram."""
    d, q = row[direction], row[direction]["queue"]
    return d["shaped_packets"] + d["unshaped_packets"], q["sent_packets"] + q["drops"] + q["backlog_packets"]


def test_the_move_to_tcx_under_traffic_counts_every_packet_once(agent_lab: Lab) -> None:
    """The move is held back (the test holds the lock it runs under) until UDP at
    twice the rate flows both ways, then let go: every packet is counted exactly
    once across it, the rates hold, and the pending state itself is a complete
    attachment (cls_bpf counters, no TCX link of ours)."""
    lab = agent_lab
    conflist = lab.conflist(shaper(tcAttach="tcx"))
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, lab.conflist(shaper(tcAttach="tc")))
    held = bpf.node_lock(name="set.lock")  # the handover's lock (and `bwplugin set`'s)
    held.__enter__()
    try:
        att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
        veth = host_veth(pod, att.result)
        time.sleep(0.3)  # the agent has queued the move and waits for the lock
        assert filter_prios(lab, veth, "ingress") == [0xB0D, 0xFB0D]  # counting by cls_bpf, redirect last
        assert filter_prios(lab, veth, "egress") == [0xB0D]
        assert tcx_chain(lab.node, veth, "ingress") == tcx_chain(lab.node, veth, "egress") == []
        assert link_pins() == []

        lab.iperf_server(peer)
        flow: dict = {}
        runner = threading.Thread(
            target=lambda: flow.update(lab.iperf(pod, peer, seconds=4, omit=0, udp_rate=2 * RATE, extra=("--bidir",)))
        )
        runner.start()
        time.sleep(2.0)  # both queues full and dropping
        held.__exit__(None, None, None)
        held = None
        moved_in = handed_over(lab.node, veth)
        runner.join()
    finally:
        if held is not None:
            held.__exit__(None, None, None)
    print(f"moved to TCX {moved_in * 1000:.0f} ms after the lock was let go, under traffic")
    assert moved_in < 1.0
    time.sleep(0.5)  # the queues drain
    (row,) = rows_of(lab, att.container_id)
    for direction in ("egress", "ingress"):
        offered, accounted = conserved(row, direction)
        assert offered == accounted, (direction, row[direction])
        assert row[direction]["queue"]["drops"] > 0.3 * offered, row[direction]  # twice the rate: half dropped
    ends = flow["end"]["streams"]
    goodput = [s["udp"]["bits_per_second"] * (1 - s["udp"]["lost_percent"] / 100) / RATE for s in ends]
    assert all(0.85 < g < 1.05 for g in goodput), goodput
    att.check()  # CHECK on the TCX path: links first, claim counting, no cls_bpf counter

    # real damage: the claim loses TCX_COUNTS (written with bpftool), so nothing counts any more
    index = json.loads(lab.run(lab.node, "ip", "-j", "link", "show", "dev", veth).stdout)[0]["ifindex"]
    claim = Path(os.environ["BWPLUGIN_PIN_DIR"]) / f"tcx_v{bpf.MAP_LAYOUT}"
    (entry,) = [e for e in json.loads(lab.run(lab.node, "bpftool", "-j", "map", "dump", "pinned", str(claim)).stdout)
                if int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") == index]  # fmt: skip
    value = int.from_bytes(bytes(int(b, 16) for b in entry["value"]), "little")
    assert value & 0x10000, hex(value)
    lab.run(lab.node, "bpftool", "map", "update", "pinned", str(claim), "key", "hex", *le_bytes(index),
            "value", "hex", *le_bytes(value & 0xFFFF))  # fmt: skip
    with pytest.raises(PluginFailed) as err:
        att.check()
    assert err.value.error["code"] == 102
    assert f"TCX claim of ifindex {index} ({veth}): expected {value:#x}, actual {value & 0xFFFF:#x}" in str(
        err.value.error["msg"]
    )
    att.delete()
    pod.attachment = None
    assert link_pins() == []


def le_bytes(n: int) -> list[str]:
    """A u32 as bpftool's hex bytes, little-endian."""
    return [f"{b:02x}" for b in n.to_bytes(4, "little")]


def test_moves_left_pending_by_a_dead_agent_are_complete_attachments_and_resumed_at_its_start(
    agent_lab: Lab,
) -> None:
    """An agent killed with moves still queued: the pending attachments pass CHECK
    and DEL removes one whole (in-process, with no agent), and the next agent's
    start moves the other (the pending record is the state, not its memory)."""
    lab = agent_lab
    conflist = lab.conflist(shaper(tcAttach="tcx"))
    gone, kept = lab.pod("gone"), lab.pod("kept")
    base = attach_count()
    held = bpf.node_lock(name="set.lock")
    held.__enter__()
    try:
        doomed = lab.attach(gone, conflist, bandwidth(egress=RATE))
        pending = lab.attach(kept, conflist, bandwidth(ingress=RATE, egress=RATE))
        time.sleep(0.2)  # both queued, the first move waiting for the lock
        lab.stop_agent(signal.SIGKILL)
    finally:
        held.__exit__(None, None, None)
    veth = host_veth(kept, pending.result)
    assert filter_prios(lab, veth, "egress") == [0xB0D] and link_pins() == []  # still counting with cls_bpf
    pending.check()  # no agent: in-process, a pending attachment is complete
    doomed.delete()
    gone.attachment = None
    assert filter_prios(lab, host_veth(kept, pending.result), "ingress") == [0xB0D, 0xFB0D]

    lab.start_agent()
    handed_over(lab.node, veth)
    assert "resumed 1 handover(s) to TCX" in (lab.tmp / "agent.log").read_text()
    pending.check()
    pending.delete()
    kept.attachment = None
    assert attach_count() == base
    assert link_pins() == []


def test_a_failed_move_leaves_the_pod_counted_by_cls_bpf_and_a_killed_one_is_finished_at_restart(
    agent_lab: Lab,
) -> None:
    """The move fails right after its from-pod link is pinned (the tests' fault
    hook): it undoes itself, and the pod stays shaped and counted by cls_bpf.
    The agent SIGKILLed at the same point leaves links but a claim that does not
    count: CHECK accepts that, and the next start finishes the move."""
    lab = agent_lab
    conflist = lab.conflist(shaper(tcAttach="tcx"))
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, lab.conflist(shaper(tcAttach="tc")))
    lab.set_fault("after-tcx")
    att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))  # ADD itself succeeds
    veth = host_veth(pod, att.result)
    deadline = time.monotonic() + 5
    while "moving its counting to TCX failed" not in (lab.tmp / "agent.log").read_text():
        assert time.monotonic() < deadline, (lab.tmp / "agent.log").read_text()[-2000:]
        time.sleep(0.02)
    lab.set_fault(None)
    assert filter_prios(lab, veth, "ingress") == [0xB0D, 0xFB0D] and filter_prios(lab, veth, "egress") == [0xB0D]
    assert link_pins() == [] and tcx_chain(lab.node, veth, "ingress") == []
    att.check()
    lab.iperf_server(peer)
    lab.iperf(pod, peer, seconds=2, omit=0, udp_rate=2 * RATE, extra=("--bidir",))
    time.sleep(0.5)
    (row,) = rows_of(lab, att.container_id)
    for direction in ("egress", "ingress"):
        offered, accounted = conserved(row, direction)
        assert offered == accounted > 1000, (direction, row[direction])

    other = lab.pod("b")
    lab.set_fault("after-tcx:kill")
    killed = lab.attach(other, conflist, bandwidth(egress=RATE))
    veth_b = host_veth(other, killed.result)
    deadline = time.monotonic() + 5
    while lab.agent is not None and lab.agent.poll() is None:
        assert time.monotonic() < deadline, "the agent was not killed in its handover"
        time.sleep(0.02)
    lab.set_fault(None)
    lab.stop_agent()
    assert tcx_chain(lab.node, veth_b, "ingress") == ["bwp_tcx_from_pod"]  # killed with links made
    assert filter_prios(lab, veth_b, "ingress") == [0xB0D, 0xFB0D]
    killed.check()  # in-process, no agent: a half-made move still counts with cls_bpf
    lab.start_agent()
    handed_over(lab.node, veth_b)
    killed.check()
