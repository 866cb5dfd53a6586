"""The demo: two pods chained ptp + host-local + bwplugin, shaped differently,
measured with iperf3 against an unshaped peer pod, then everything removed."""

from __future__ import annotations

import argparse
import sys

from . import stats
from .lab import Lab, Pod
from .measure import TCP_GOODPUT_CEILING, Sampler, iperf_goodput

PODS = {
    "pod-a": {"ingressRate": 10_000_000, "egressRate": 5_000_000},
    "pod-b": {"ingressRate": 80_000_000, "egressRate": 40_000_000},
}
CONTAINERD_BURST = 4294967295  # what containerd sends for both bursts


def _host_devices(pod: Pod) -> tuple[str, str]:
    """(host veth, ifb) from the pod's CNI result."""
    assert pod.attachment and pod.attachment.result
    ifaces = pod.attachment.result["interfaces"]
    veth = next(i["name"] for i in ifaces if not i.get("sandbox") and not i["name"].startswith("bwpl"))
    ifb = next(i["name"] for i in ifaces if i["name"].startswith("bwpl"))
    return veth, ifb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4, help="length of each iperf3 run")
    args = parser.parse_args()

    print("bwplugin demo: pods in private network namespaces, chained ptp -> bwplugin")
    rows = []
    with Lab() as lab:
        conflist = lab.conflist({"type": "bwplugin", "capabilities": {"bandwidth": True}})
        peer = lab.pod("peer")
        lab.attach(peer, conflist)  # no bandwidth: bwplugin passes the result through
        pods = []
        for name, rates in PODS.items():
            pod = lab.pod(name)
            bw = {**rates, "ingressBurst": CONTAINERD_BURST, "egressBurst": CONTAINERD_BURST}
            att = lab.attach(pod, conflist, {"bandwidth": bw})
            att.check()
            veth, ifb = _host_devices(pod)
            print(f"  {name}: {pod.ip} host veth {veth}, ifb {ifb}, ADD {att.timings['bwplugin:ADD'] * 1000:.0f} ms")
            pods.append((name, pod, rates, veth, ifb))
        lab.iperf_server(peer)
        for name, pod, rates, veth, ifb in pods:
            for direction, dev, reverse in (("ingress", veth, True), ("egress", ifb, False)):
                with Sampler(lab.node, [dev]) as sampler:
                    result = lab.iperf(pod, peer, seconds=args.seconds, reverse=reverse)
                wire = sampler.steady_rate(dev)
                rows.append((name, direction, rates[f"{direction}Rate"], iperf_goodput(result), wire))
        print("\n`bwplugin stats` on the demo's node after the runs:\n")
        print(stats.table(stats.collect(lab.node)))
    print()
    print(f"{'pod':8} {'direction':9} {'configured':>12} {'goodput':>12} {'wire (tc)':>12} {'wire/conf':>10}")
    for name, direction, conf, goodput, wire in rows:
        print(
            f"{name:8} {direction:9} {conf / 1e6:9.1f} Mb {goodput / 1e6:9.2f} Mb {wire / 1e6:9.2f} Mb "
            f"{wire / conf:10.3f}"
        )
    print(f"\n(TCP goodput tops out at {TCP_GOODPUT_CEILING:.3f} of the wire rate: 1448-byte MSS in 1514-byte frames)")
    print("all test namespaces, veths, ifbs and map entries removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
