"""Live rate changes (`bwplugin set`) on pods run by a real containerd over CRI,
with the installed executable, as an operator on the node runs it, through the
node agent and without it.

Independent readers only: rates from the shaping qdisc's byte counters read with
`tc -j`, objects with iproute2 and bpftool, retransmission timeouts from the
sender's own /proc/net/netstat (TcpExt TCPTimeouts), and CHECK as libcni runs it
with what containerd cached at ADD (so it carries the ADD-time runtimeConfig)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from bench.lab.containerd import Containerd, LabError, Sandbox, bwplugin_conf

from .oracle import after_handover
from .test_containerd import ANNOTATED, assert_holds, assert_nothing_left, map_entries, qdiscs

pytestmark = pytest.mark.kernel
M = 1_000_000


@pytest.fixture(params=["in-process", "agent"])
def ctrd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    with Containerd(agent=request.param == "agent") as c:
        yield c


def tcp_timeouts(c: Containerd, netns: str) -> int:
    """TcpExt TCPTimeouts of a network namespace, from its /proc/net/netstat."""
    lines = c.in_node("nsenter", f"--net={netns}", "cat", "/proc/net/netstat").stdout.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["TCPTimeouts"])
    raise LabError("no TcpExt line in /proc/net/netstat")


def root_qdisc(c: Containerd, dev: str) -> dict:
    (root,) = [q for q in qdiscs(c, dev) if q.get("root")]
    return root


def set_json(c: Containerd, *args: str) -> dict:
    out = c.bwplugin("set", *args, "--json")
    assert out.returncode == 0, out.stderr
    if out.stderr.strip():
        print("bwplugin set:", out.stderr.strip())
    return dict(json.loads(out.stdout))


def window_rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """bits/s the qdisc sent between two offsets (s) from the first sample."""
    t0 = samples[0][0]
    inside = [(t - t0, b) for t, b in samples if start <= t - t0 <= end]
    (ta, ba), (tb, bb) = inside[0], inside[-1]
    return (bb - ba) * 8 / (tb - ta)


def flow_through_a_change(c: Containerd, pod: Sandbox, direction: str, *set_args: str) -> tuple[float, float, int]:
    """A 9 s TCP flow; at 4.5 s `bwplugin set` runs. Asserts that the flow never
    stops: iperf3 completes, no second moves nothing, and after the change the
    qdisc sends something in every 300 ms. Returns the wire rate over 1-4 s and
    over 6-8.5 s, and the sender's retransmission timeouts from just before the
    change to 1.5 s after it (reported, not asserted: a rate cut under tail drop
    can cost TCP one, see docs/operations.md)."""
    gateway, veth = c.gateway(pod), c.host_veth(pod)
    dev = veth if direction == "ingress" else c.ifb_of(veth)
    sender = c.node if direction == "ingress" else pod.netns
    server = subprocess.Popen(
        ["nsenter", f"--net={c.node}", "iperf3", "-s", "-1", "-B", gateway, "-p", "5301"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not c.in_node("ss", "-Hltn", "sport = :5301").stdout.strip():
            assert time.monotonic() < deadline, "iperf3 server did not listen"
            time.sleep(0.05)
        argv = ["iperf3", "-c", gateway, "-p", "5301", "-t", "9", "-J", *(["-R"] if direction == "ingress" else [])]
        client = subprocess.Popen(["nsenter", f"--net={pod.netns}", *argv], stdout=subprocess.PIPE)
        samples = [(time.monotonic(), c.qdisc_bytes(dev))]
        changed_at = 0.0
        rtos = before = 0
        timeline: list[str] = []  # for a failure's message: RTOs and bytes sent around the change
        deadline = time.monotonic() + 40
        while client.poll() is None:
            if time.monotonic() > deadline:
                client.kill()
                raise LabError(f"iperf3 did not finish: {client.communicate()[0][-800:]!r}")
            time.sleep(0.1)
            samples.append((time.monotonic(), c.qdisc_bytes(dev)))
            if not changed_at and samples[-1][0] - samples[0][0] > 4.5:
                before = tcp_timeouts(c, sender)
                started = time.monotonic()
                set_json(c, *set_args)
                changed_at = time.monotonic()
                timeline.append(f"set took {changed_at - started:.3f}s")
            if changed_at and not rtos:
                timeline.append(f"{samples[-1][0] - changed_at:+.2f}s rto={tcp_timeouts(c, sender) - before} "
                                f"sent={samples[-1][1]}")  # fmt: skip
            if changed_at and time.monotonic() - changed_at > 1.5 and not rtos:
                rtos = tcp_timeouts(c, sender) - before + 1  # +1: read once
        out, _ = client.communicate()
        assert client.returncode == 0 and changed_at and rtos, timeline
        intervals = json.loads(out)["intervals"]
        assert all(i["sum"]["bytes"] > 0 for i in intervals), "the flow stalled for a whole second"
        still = longest = 0.0  # the longest time the qdisc sent nothing, after the change
        after = [(t, b) for t, b in samples if t >= changed_at]
        for (t1, b1), (t2, b2) in zip(after, after[1:], strict=False):
            still = still + t2 - t1 if b2 == b1 else 0.0
            longest = max(longest, still)
        assert longest < 0.3, f"the queue stood still for {longest:.2f} s after the change: {timeline}"
        print(f"{direction} {' '.join(set_args[2:])}: {rtos - 1} RTO(s) across the change; {timeline[0]}")
        return window_rate(samples, 1.0, 4.0), window_rate(samples, 6.0, 8.5), rtos - 1
    finally:
        server.kill()
        server.wait()


def test_rates_change_in_place_under_a_running_tcp_flow_that_never_stops(ctrd: Containerd) -> None:
    pod = ctrd.run_pod("pod-live", ANNOTATED, namespace="team-a")  # 10M in, 20M out
    veth = ctrd.host_veth(pod)
    ifb = ctrd.ifb_of(veth)
    tbf_before = root_qdisc(ctrd, ifb)

    # a cut, where the pod sends: its packets are dropped at the ifb, out of its socket's sight,
    # as any sender's are on a path; the bucket shrinks under a queue of GSO packets
    slow, fast, _rtos = flow_through_a_change(ctrd, pod, "egress", "--pod", "team-a/pod-live", "--egress", "10M")
    assert abs(slow / (20 * M) - 1) < 0.05, slow
    assert abs(fast / (10 * M) - 1) < 0.05, fast
    tbf_after = root_qdisc(ctrd, ifb)
    assert (tbf_after["handle"], tbf_after["kind"]) == (tbf_before["handle"], "tbf")  # the same qdisc, changed
    assert ctrd.ifb_of(veth) == ifb  # the same ifb
    assert tbf_after["options"]["rate"] == 10 * M // 8, tbf_after  # tc -j: bytes/s

    slow, fast, _rtos = flow_through_a_change(ctrd, pod, "ingress", "--container", pod.id[:16], "--ingress", "20M")
    assert abs(slow / (10 * M) - 1) < 0.05, slow
    assert abs(fast / (20 * M) - 1) < 0.05, fast

    # the runtime's CHECK carries ADD's runtimeConfig (10M/20M): the overrides are what it verifies
    check = ctrd.cni_check(pod)
    assert check.returncode == 0 and check.stdout == "", (check.stdout, check.stderr)
    rows = json.loads(ctrd.bwplugin("stats", "--json", check=True).stdout)
    (row,) = [r for r in rows if r["pod"] == "pod-live"]
    assert (row["ingress"]["queue"]["rate_bps"], row["ingress"]["source"]) == (20 * M, "override")
    assert (row["egress"]["queue"]["rate_bps"], row["egress"]["source"]) == (10 * M, "override")
    assert row["live_changes"] == 2
    assert "20M*" in ctrd.bwplugin("stats", check=True).stdout

    # real damage is still damage: a rate changed behind bwplugin's back
    ctrd.in_node("tc", "qdisc", "change", "dev", ifb, "root", "handle", "b0d0:", "tbf", "rate", "7mbit",
                 "burst", "64kb", "latency", "25ms")  # fmt: skip
    check = ctrd.cni_check(pod)
    assert check.returncode == 1, check.stdout
    err = json.loads(check.stdout)
    assert err["code"] == 102 and "rate expected 1250000, actual 875000" in err["msg"], err

    ctrd.remove_pod(pod)
    assert map_entries(ctrd, "shaping_v3") == []  # DEL removes the override with the attachment
    assert_nothing_left(ctrd)


def test_a_direction_can_be_shaped_later_lifted_and_reset(ctrd: Containerd) -> None:
    pod = ctrd.run_pod("pod-in", {"kubernetes.io/ingress-bandwidth": "10M"})
    veth = ctrd.host_veth(pod)
    assert not ctrd.ifb_of(veth)

    out = set_json(ctrd, "--veth", veth, "--egress", "15M")
    assert out["changed"] and out["egress"] == {"rate": 15 * M, "burst": 4294967295, "source": "override"}
    ifb = ctrd.ifb_of(veth)
    assert ifb and out["attachment"]["ifb"] == ifb
    assert_holds(ctrd, pod, "egress", 15 * M)
    assert ctrd.cni_check(pod).returncode == 0

    out = set_json(ctrd, "--veth", veth, "--ingress", "none")
    assert out["ingress"]["rate"] == 0
    assert [q["kind"] for q in qdiscs(ctrd, veth) if q.get("root")] in ([], ["noqueue"])
    free = ctrd.iperf(pod, "ingress", seconds=2)
    assert free.goodput > 10 * 10 * M, free
    assert_holds(ctrd, pod, "egress", 15 * M)  # the other direction is untouched
    check = ctrd.cni_check(pod)
    assert check.returncode == 0, check.stdout

    # the same values again change nothing
    assert not set_json(ctrd, "--veth", veth, "--ingress", "none")["changed"]
    # both directions lifted: no qdisc, no ifb; the counting filters stay, and CHECK accepts that
    set_json(ctrd, "--veth", veth, "--egress", "none")
    assert not ctrd.ifb_of(veth) and [q["kind"] for q in qdiscs(ctrd, veth) if q.get("root")] in ([], ["noqueue"])
    check = ctrd.cni_check(pod)
    assert check.returncode == 0, check.stdout

    out = set_json(ctrd, "--veth", veth, "--reset")
    assert out["ingress"] == {"rate": 10 * M, "burst": 4294967295, "source": "runtime"}
    assert out["egress"]["rate"] == 0 and not ctrd.ifb_of(veth)
    assert not any(link.startswith("bwpl") for link in ctrd.in_node("ip", "-o", "link").stdout.split())
    assert_holds(ctrd, pod, "ingress", 10 * M)
    assert ctrd.cni_check(pod).returncode == 0
    ctrd.remove_pod(pod)
    assert_nothing_left(ctrd)


BAD = [
    (["--pod", "bwpt-ns/pod-bad", "--egress", "10Q"], 7, ["egress='10Q'", "Kubernetes quantity"]),
    (["--pod", "bwpt-ns/pod-bad", "--egress", "500"], 7, ["egress='500'", "1k..1P"]),
    (["--pod", "bwpt-ns/pod-bad", "--ingress", "none", "--ingress-burst", "1M"], 7, ["ingressBurst"]),
    (["--pod", "bwpt-ns/nobody", "--egress", "10M"], 3, ["bwpt-ns/nobody"]),
    (["--pod", "no-slash", "--egress", "10M"], 7, ["pod='no-slash'"]),
    (["--egress", "10M"], 7, ["select the attachment"]),
    (["--pod", "bwpt-ns/pod-bad"], 7, ["nothing to change"]),
    (["--pod", "bwpt-ns/pod-bad", "--shaped-subnets", "10.0.0.0/8"], 7, ["plain TBF"]),
    (["--pod", "bwpt-ns/pod-bad", "--unshaped-subnets", "10.0.0.1/8"], 7, ["unshapedSubnets[0]='10.0.0.1/8'"]),
]


def test_bad_input_is_a_clear_error_and_changes_nothing(ctrd: Containerd) -> None:
    pod = ctrd.run_pod("pod-bad", ANNOTATED)
    veth = ctrd.host_veth(pod)
    after_handover(ctrd.node, veth, through_agent=ctrd.agent)  # the move rewrites the shaping record once

    def state() -> tuple[dict, dict, list]:
        return root_qdisc(ctrd, veth), root_qdisc(ctrd, ctrd.ifb_of(veth)), map_entries(ctrd, "shaping_v3")

    before = state()
    for args, code, words in BAD:
        out = ctrd.bwplugin("set", *args)
        assert out.returncode == 1 and f"(code {code})" in out.stderr, (args, out.stderr)
        for word in words:
            assert word in out.stderr, (args, out.stderr)
        assert state() == before, args


def test_a_subnet_list_and_a_rate_change_live_and_traffic_follows_them() -> None:
    """An attachment made with unshapedSubnets (HTB over a TBF leaf): the list
    changes live, and traffic to the node moves between the shaped and the
    unshaped class; then a rate cut under the shaped class's TBF leaf holds, and
    CHECK accepts both overrides."""
    shaper = bwplugin_conf(unshapedSubnets=["10.99.0.0/16"])
    with Containerd(shaper=shaper, agent=True) as c:
        pod = c.run_pod("pod-split", ANNOTATED)  # 10M in, 20M out
        gateway = c.gateway(pod)
        assert_holds(c, pod, "egress", 20 * M)  # the node is not listed: shaped
        out = set_json(c, "--pod", "bwpt-ns/pod-split", "--unshaped-subnets", f"10.99.0.0/16,{gateway}/32")
        assert sorted(out["subnets"]) == sorted(["10.99.0.0/16", f"{gateway}/32"]) and out["changed"]
        keys = [e["key"] for e in map_entries(c, "subnets_v3")]
        assert len(keys) == 2, keys  # the trie, read with bpftool
        free = c.iperf(pod, "egress", seconds=2)
        assert free.goodput > 10 * 20 * M, free  # listed now: the unshaped class
        check = c.cni_check(pod)  # ADD's config listed only 10.99.0.0/16: the live list is what CHECK holds to
        assert check.returncode == 0, check.stdout
        out = set_json(c, "--pod", "bwpt-ns/pod-split", "--unshaped-subnets", "10.99.0.0/16")
        assert out["subnets"] == ["10.99.0.0/16"]
        assert_holds(c, pod, "egress", 20 * M)
        out = set_json(c, "--pod", "bwpt-ns/pod-split", "--egress", "10M")
        assert out["egress"] == {"rate": 10 * M, "burst": out["egress"]["burst"], "source": "override"}, out
        assert_holds(c, pod, "egress", 10 * M)
        leaf = [q for q in qdiscs(c, c.ifb_of(c.host_veth(pod))) if q.get("parent") == "b0d0:1"]
        assert [(q["kind"], q["options"]["rate"]) for q in leaf] == [("tbf", 10 * M // 8)], leaf
        check = c.cni_check(pod)
        assert check.returncode == 0, check.stdout
        c.remove_pod(pod)
        assert_nothing_left(c)
