"""shapedSubnets / unshapedSubnets and IPv6, on real dual-stack ptp pods: an
unshaped peer gets the veth's full speed while a shaped one is held to the rate,
in both directions and both address families."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from bench.lab.lab import Lab, Pod
from bench.lab.libcni import PluginFailed, plugin_conf
from bench.lab.measure import TCP_GOODPUT_CEILING, Sampler, iperf_goodput
from bwplugin.cni.config import Direction, Policy
from bwplugin.datapath import bpf, tc
from bwplugin.datapath.netlink import NLM_F_CREATE, NLM_F_EXCL, RTM_NEWTCLASS, Netlink, nla, nla_str, nla_u64, tcmsg
from bwplugin.datapath.shaping import tbf_params

from .conftest import bandwidth, host_veth, shaper
from .oracle import lpm_ids, view

pytestmark = pytest.mark.kernel
SUBNET6 = "fd00:b0d:1::/64"
RATE = 10_000_000


def wait_dad(lab: Lab, *pods: Pod) -> None:
    """iperf3 cannot bind an IPv6 address until duplicate address detection ends."""
    deadline = time.monotonic() + 10
    for pod in pods:
        while "tentative" in lab.run(pod.netns, "ip", "-6", "addr").stdout:
            assert time.monotonic() < deadline, "IPv6 addresses stayed tentative"
            time.sleep(0.1)


def dual_stack_lab(lab: Lab, static: dict) -> tuple[Pod, Pod, Pod]:
    """Two peers (fast, slow) and a pod shaped at RATE both ways with `static`
    (whose subnets name the fast peer's addresses) on a dual-stack ptp network."""
    conflist = lab.conflist(shaper(), subnet6=SUBNET6)
    fast, slow, pod = lab.pod("fast"), lab.pod("slow"), lab.pod("a")
    lab.attach(fast, conflist)
    lab.attach(slow, conflist)
    subnets = static["unshapedSubnets"](fast) if "unshapedSubnets" in static else static["shapedSubnets"](slow)
    key = "unshapedSubnets" if "unshapedSubnets" in static else "shapedSubnets"
    lab.attach(pod, lab.conflist(shaper(**{key: subnets}), subnet6=SUBNET6), bandwidth(ingress=RATE, egress=RATE))
    wait_dad(lab, fast, slow, pod)
    for peer in (fast, slow):
        lab.iperf_server(peer, any_address=True)
    return fast, slow, pod


@pytest.fixture
def lab1() -> Iterator[Lab]:
    """Traffic tests run through one path (the lab fixture runs both): what is
    measured here is the kernel's data path, which the two paths build alike."""
    with Lab() as the_lab:
        yield the_lab


@pytest.mark.parametrize("key", ["unshapedSubnets", "shapedSubnets"])
def test_subnets_split_traffic_both_directions_and_families(lab1: Lab, key: str) -> None:
    """TCP to the unshaped peer must run far above the rate; UDP offered at 1.5x
    the rate to the shaped peer must leave the shaper at the rate (within 2 %)."""
    lab = lab1

    def cidrs(p: Pod) -> list[str]:
        return [f"{p.ip}/32", f"{p.ip6}/128"]

    fast, slow, pod = dual_stack_lab(lab, {key: cidrs})
    veth = host_veth(pod)
    ifb = pod.attachment.result["interfaces"][-1]["name"]
    kv = view(lab.node)
    for dev in (veth, ifb):  # HTB that only sorts, an explicit quantum, the rate in the TBF leaf
        assert kv.root(dev)["kind"] == "htb"
        shaped, unshaped = kv.htb_class(dev, 0xB0D00001), kv.htb_class(dev, 0xB0D00002)
        assert shaped["rate"] == unshaped["rate"] == 2**32 - 1  # 1 Tbit/s: the 32-bit field saturates
        assert shaped["quantum"] > 0 and unshaped["quantum"] > 0
        (leaf,) = [q for q in kv.qdiscs[dev] if q["parent"] == 0xB0D00001]
        assert leaf["kind"] == "tbf" and leaf["handle"] == 0xB0D10000 and leaf["rate"] == RATE // 8, leaf
    pod.attachment.check()

    for family, ip_of in ((4, lambda p: p.ip), (6, lambda p: p.ip6)):
        for reverse in (False, True):
            where = ("ingress" if reverse else "egress", f"IPv{family}")
            dev = veth if reverse else ifb
            fast_bps = iperf_goodput(lab.iperf(pod, fast, seconds=1, omit=0, reverse=reverse, server_ip=ip_of(fast)))
            assert fast_bps > 10 * RATE, (*where, "unshaped peer", fast_bps)
            with Sampler(lab.node, [dev]) as s:
                lab.iperf(pod, slow, seconds=2, reverse=reverse, server_ip=ip_of(slow), udp_rate=RATE * 3 // 2)
            assert abs(s.steady_rate(dev) / RATE - 1) < 0.02, (*where, "shaped peer", s.steady_rate(dev))

    # the eBPF counters saw both classes in both directions
    fd = bpf.open_map()
    (entry,) = [e for e in bpf.attach_entries(fd).values() if e.container_id == pod.attachment.container_id]
    os.close(fd)
    assert entry.from_pod_unshaped.bytes > entry.from_pod_shaped.bytes > 0
    assert entry.to_pod_unshaped.bytes > entry.to_pod_shaped.bytes > 0


def test_dual_stack_pod_is_shaped_in_both_families(lab1: Lab) -> None:
    lab = lab1
    conflist = lab.conflist(shaper(), subnet6=SUBNET6)
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
    assert {":" in str(ip["address"]) for ip in pod.attachment.result["ips"]} == {True, False}
    wait_dad(lab, peer, pod)
    lab.iperf_server(peer, any_address=True)
    devices = {"egress": pod.attachment.result["interfaces"][-1]["name"], "ingress": host_veth(pod)}
    for direction, dev in devices.items():
        for server_ip in (peer.ip, peer.ip6):
            with Sampler(lab.node, [dev]) as s:
                lab.iperf(pod, peer, seconds=2, reverse=direction == "ingress", server_ip=server_ip,
                          udp_rate=RATE * 3 // 2)  # fmt: skip
            assert abs(s.steady_rate(dev) / RATE - 1) < 0.02, (direction, server_ip, s.steady_rate(dev))
    pod.attachment.check()


def test_check_detects_changed_subnets(lab: Lab) -> None:
    conflist = lab.conflist(shaper(unshapedSubnets=["10.99.0.0/16", "fd00:99::/32"]))
    pod = lab.pod("a")
    att = lab.attach(pod, conflist, bandwidth(egress=RATE))
    att.check()
    fd, lpm = bpf.open_map(), bpf.open_lpm()
    (attach_id,) = [i for i, e in bpf.attach_entries(fd).items() if e.container_id == att.container_id]
    assert sorted(map(str, bpf.subnets_of(lpm, attach_id))) == ["10.99.0.0/16", "fd00:99::/32"]
    bpf.map_delete(lpm, bpf.lpm_key(attach_id, ipaddress.ip_network("fd00:99::/32")))
    with pytest.raises(PluginFailed) as err:
        att.check()
    assert err.value.error["code"] == 102 and "subnets expected" in err.value.error["msg"]
    att.delete()
    pod.attachment = None
    assert attach_id not in bpf.attach_entries(fd) and attach_id not in lpm_ids(lpm)


def test_subnets_from_runtime_config_and_bad_subnets(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))
    runtime = {"bandwidth": {**bandwidth(egress=RATE)["bandwidth"], "shapedSubnets": ["192.0.2.0/24"]}}
    conf = plugin_conf(att.conflist, shaper(), att.result, runtime)
    inv = lab.exec_shaper("ADD", pod, conf)
    assert inv.rc == 0, inv.stdout
    ifb = json.loads(inv.stdout)["interfaces"][-1]["name"]
    assert view(lab.node).root(ifb)["defcls"] == 2  # shapedSubnets: everything else is unshaped
    assert lab.exec_shaper("DEL", pod, conf).rc == 0
    for bad, needle in (
        ({"shapedSubnets": ["10.0.0.0/8"], "unshapedSubnets": ["10.1.0.0/16"]}, "mutually exclusive"),
        ({"unshapedSubnets": ["10.0.0.1/8"]}, "unshapedSubnets[0]='10.0.0.1/8' is not a valid CIDR"),
        ({"unshapedSubnets": "10.0.0.0/8"}, "must be a list of CIDRs"),
        ({"egressRedirect": "tunnel"}, "egressRedirect='tunnel' must be one of"),
    ):
        conf = plugin_conf(att.conflist, shaper(**bad), att.result, bandwidth(egress=RATE))
        inv = lab.exec_shaper("ADD", pod, conf)
        err = json.loads(inv.stdout)
        assert (inv.rc, err["code"]) == (1, 7) and needle in err["msg"], err
    assert view(lab.node).ifbs() == []


@pytest.mark.parametrize("key", ["shapedSubnets", "unshapedSubnets"])
def test_packets_that_are_not_ip_take_the_default_class(lab1: Lab, key: str) -> None:
    """docs/configuration.md: ARP (not IP) takes the default class, unshaped with
    shapedSubnets and shaped with unshapedSubnets, while IP follows the list. The pod
    pings a peer named in the list after its neighbour cache is flushed: the ICMP
    requests land in the listed class, the ARP request for its gateway in the other
    one; counted by HTB's own class counters on the ifb, read with tc (its text: this
    tc has no JSON for classes; IPv6 is off in the pod, so nothing else of it is sent)."""
    lab = lab1
    conflist = lab.conflist(shaper())
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    lab.run(pod.netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    att = lab.attach(pod, lab.conflist(shaper(**{key: [f"{peer.ip}/32"]})), bandwidth(egress=RATE))
    ifb = att.result["interfaces"][-1]["name"]
    assert ifb.startswith("bwpl"), att.result

    def classes() -> dict[str, tuple[int, int]]:
        out = lab.run(lab.node, "tc", "-s", "class", "show", "dev", ifb).stdout
        found = re.findall(r"^class htb (\S+) .*?\n Sent (\d+) bytes (\d+) pkt", out, re.M | re.S)
        return {handle: (int(pkts), int(size)) for handle, size, pkts in found}

    lab.run(pod.netns, "ip", "neigh", "flush", "all")
    before = classes()
    count, payload = 5, 1000
    lab.run(pod.netns, "ping", "-c", str(count), "-i", "0.2", "-s", str(payload), "-q", peer.ip)
    after = classes()
    delta = {h: (after[h][0] - before[h][0], after[h][1] - before[h][1]) for h in after}
    listed, default = ("b0d0:1", "b0d0:2") if key == "shapedSubnets" else ("b0d0:2", "b0d0:1")
    frame = 14 + 20 + 8 + payload  # Ethernet, IPv4, ICMP, payload
    assert delta[listed] == (count, count * frame), delta
    arp_packets, arp_bytes = delta[default]
    assert arp_packets >= 1 and arp_bytes == 42 * arp_packets, delta  # ARP over Ethernet: 42 bytes unpadded


def test_htb_gets_no_kernel_warnings_and_one_would_be_seen(lab: Lab) -> None:
    """The reference's subnet support was reverted over HTB's quantum warnings, which
    current kernels send as extended-ACK messages on a request that succeeds (not to
    dmesg). bwplugin's netlink keeps and logs them: a class made without a quantum at
    40 Gbit/s is warned about (the control: the warning is seen), bwplugin's own HTB
    at 1 kbit/s, 10 Mbit/s and 40 Gbit/s is not, and no plugin run logs one."""
    subprocess.run(["ip", "-n", os.path.basename(lab.node), "link", "add", "bwpt-xack", "type", "ifb"], check=True)
    with Netlink.in_netns(lab.node) as nl:
        link = nl.link(name="bwpt-xack")
        assert link is not None
        tc.add_htb(nl, link.index, tbf_params(Direction(40_000_000_000, 80_000_000), Policy()), True, 1500)
        assert nl.warnings == []
        rate = 40_000_000_000 // 8  # bytes/s: the 32-bit field saturates, the rate goes in RATE64
        spec = (0, 1, 0, 0, 0, 0xFFFFFFFF)  # struct tc_ratespec (linklayer ethernet)
        opt = struct.pack(
            "=" + "BBHhHI" * 2 + "IIIII", *spec, *spec, 1000, 1000, 0, 0, 0
        )  # quantum 0: the kernel's r2q
        opts = nla(tc.TCA_HTB_PARMS, opt) + nla_u64(tc.TCA_HTB_RATE64, rate) + nla_u64(tc.TCA_HTB_CEIL64, rate)
        body = tcmsg(link.index, tc.ROOT_HANDLE | 9, tc.ROOT_HANDLE) + nla_str(tc.TCA_KIND, "htb")
        body += nla(tc.TCA_OPTIONS, opts)
        nl.request(RTM_NEWTCLASS, NLM_F_CREATE | NLM_F_EXCL, body, "add a class without a quantum")
        assert len(nl.warnings) == 1 and "quantum of class B0D00009 is big" in nl.warnings[0], nl.warnings
    conflist = lab.conflist(shaper(unshapedSubnets=["10.99.0.0/16"]))
    for name, rate in (("slow", 1_000), ("mid", 10_000_000), ("fast", 40_000_000_000)):
        att = lab.attach(lab.pod(name), conflist, bandwidth(ingress=rate, egress=rate))
        assert "kernel warning" not in att.logs["bwplugin:ADD"], att.logs
        att.check()
        assert "kernel warning" not in att.logs["bwplugin:CHECK"], att.logs


def test_big_tcp_gso_packets_pass_the_shaped_htb_leaf(lab1: Lab) -> None:
    """BIG TCP (gso_max_size 185000 on the pod's veth pair) lets the pod's TCP build
    GSO packets past 64 KiB. HTB never segments; its shaped leaf is a TBF, which
    segments what its bucket cannot take whole, sized from the devices' real limit
    (read at ADD; CHECK compares the same): TCP through the shaped class over IPv6
    (BIG TCP's family) holds, with the queue bounded by latencyMs."""
    lab = lab1
    big = 185_000
    conflist = lab.conflist(None, subnet6=SUBNET6)
    slow, pod = lab.pod("slow"), lab.pod("a")
    lab.attach(slow, conflist)
    att = lab.attach(pod, conflist)  # ptp first: BIG TCP is on before bwplugin's ADD
    veth = host_veth(pod)
    for netns, dev in ((pod.netns, "eth0"), (lab.node, veth)):
        lab.run(netns, "ip", "link", "set", "dev", dev, "gso_max_size", str(big), "gro_max_size", str(big))
    shaped = shaper(shapedSubnets=[f"{slow.ip}/32", f"{slow.ip6}/128"])
    conf = plugin_conf(att.conflist, shaped, att.result, bandwidth(ingress=RATE, egress=RATE))
    add = lab.exec_shaper("ADD", pod, conf)
    assert add.rc == 0, add.stdout
    result = json.loads(add.stdout)
    try:
        ifb = result["interfaces"][-1]["name"]
        check = lab.exec_shaper("CHECK", pod, {**conf, "prevResult": result})
        assert check.rc == 0, check.stdout
        for dev in (veth, ifb):
            leaves = json.loads(lab.run(lab.node, "tc", "-j", "qdisc", "show", "dev", dev).stdout)
            (leaf,) = [q for q in leaves if q.get("parent") == "b0d0:1"]
            assert leaf["kind"] == "tbf", leaf
        wait_dad(lab, slow, pod)
        lab.iperf_server(slow, any_address=True)
        # IPv6's ceiling is 1.4 % lower than the IPv4 one TCP_GOODPUT_CEILING names. The
        # leaf is plain mode's TBF, whose fresh 3 s flows read ~0.92 about 1 run in 12 (an
        # early timeout under tail drop, docs/operations.md): a shortfall is measured once more
        low = 0.93 * TCP_GOODPUT_CEILING * RATE
        runs = [iperf_goodput(lab.iperf(pod, slow, seconds=3, server_ip=slow.ip6))]
        if runs[0] <= low:
            runs.append(iperf_goodput(lab.iperf(pod, slow, seconds=3, server_ip=slow.ip6)))
        assert runs[-1] > low, runs
    finally:
        lab.exec_shaper("DEL", pod, {**conf, "prevResult": result})


def _rtts(lab: Lab, pod: Pod, peer: Pod, count: int) -> list[float]:
    out = lab.run(pod.netns, "ping", "-n", "-i", "0.05", "-c", str(count), "-W", "5", peer.ip).stdout
    return sorted(float(x) for x in re.findall(r"time=([\d.]+) ms", out))


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_subnet_mode_bounds_the_queue_like_plain_mode(lab1: Lab, direction: str) -> None:
    """The shaped class's queue is held to latencyMs (25 ms) as a plain TBF's is:
    a ping to the shaped peer behind a bulk TCP flow to it waits about as long
    in subnet mode as in plain mode. (With a bfifo leaf, which had to hold two
    whole 64 KiB GSO packets because HTB does not segment, the same ping took
    ~50 ms at the median and up to ~150 ms.) Plain mode is measured in the same
    run as the control; the speed targets themselves are in bench/."""
    lab = lab1
    peer, other = lab.pod("slow"), lab.pod("fast")
    for p in (peer, other):
        lab.attach(p, lab.conflist(shaper()))
    lab.iperf_server(peer)
    medians = {}
    for mode, static in (("plain", {}), ("subnets", {"unshapedSubnets": [f"{other.ip}/32"]})):
        pod = lab.pod(f"lat-{mode}")
        lab.attach(pod, lab.conflist(shaper(**static)), bandwidth(**{direction: RATE}))
        argv = ["iperf3", "-c", peer.ip, "-t", "30"] + (["-R"] if direction == "ingress" else [])
        load = lab.spawn(pod.netns, *argv)
        try:
            time.sleep(2.0)  # the flow fills the queue
            rtts = _rtts(lab, pod, peer, 60)
        finally:
            load.terminate()
            load.wait()
        lab.remove_pod(pod)
        time.sleep(0.5)  # the server notices the end of the test
        assert len(rtts) >= 50, (mode, rtts)
        medians[mode] = rtts[len(rtts) // 2]
        p90 = rtts[int(len(rtts) * 0.9)]
        # the queue holds 25 ms at the rate; a ping also waits for the packet in service
        assert p90 < 40, (mode, direction, rtts)
    assert medians["subnets"] < medians["plain"] * 1.5 + 3, medians


def test_a_pod_of_the_legacy_subnet_layout_passes_check_and_changes_live(lab1: Lab) -> None:
    """Pods that a build before 2026-12-03 shaped in subnet mode keep their layout
    through an upgrade: the HTB's shaped class holds the rate, over a bfifo of two
    GSO packets. No older build is installed here, so a fresh pod's ingress root
    is rebuilt in that layout with iproute2 (the stand-in). CHECK accepts it;
    `bwplugin set` changes it in place, class and bfifo; CHECK accepts the result
    and still reports damage to the legacy class."""
    lab = lab1
    pod = lab.pod("legacy")
    att = lab.attach(pod, lab.conflist(shaper(unshapedSubnets=["10.99.0.0/16"])), bandwidth(ingress=RATE))
    veth = host_veth(pod)

    def tc_(*argv: str) -> None:
        lab.run(lab.node, "tc", *argv)

    tc_("qdisc", "del", "dev", veth, "parent", "b0d0:1")
    tc_("class", "change", "dev", veth, "parent", "b0d0:", "classid", "b0d0:1", "htb", "rate", "10mbit",
        "ceil", "10mbit", "burst", "12500", "cburst", "12500", "quantum", "125000")  # fmt: skip
    tc_("qdisc", "add", "dev", veth, "parent", "b0d0:1", "handle", "b0d1:", "bfifo", "limit", "134100")
    att.check()

    cli = [str(lab.bin_dir / "bwplugin"), "set", "--container", att.container_id, "--ingress", "5M", "--json"]
    out = subprocess.run(["nsenter", f"--net={lab.node}", *cli], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ingress"]["rate"] == 5_000_000
    kv = view(lab.node)
    assert kv.htb_class(veth, 0xB0D00001)["rate"] == 5_000_000 // 8  # the class itself, as that build had it
    (leaf,) = json.loads(lab.run(lab.node, "tc", "-j", "qdisc", "show", "dev", veth, "parent", "b0d0:1").stdout)
    assert (leaf["kind"], leaf["options"]["limit"]) == ("bfifo", 134_100), leaf
    att.check()

    tc_("class", "change", "dev", veth, "parent", "b0d0:", "classid", "b0d0:1", "htb", "rate", "20mbit",
        "ceil", "20mbit", "burst", "12500", "cburst", "12500", "quantum", "125000")  # fmt: skip
    with pytest.raises(PluginFailed) as failed:
        att.check()
    assert "class b0d0:1: rate expected 625000, actual 2500000" in str(failed.value), failed.value
