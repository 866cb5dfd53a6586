"""The main demo: Kubernetes-annotated pods under a real containerd.

A private containerd (Debian's, with its CRI plugin) runs the conflist
ptp + host-local -> bwplugin with bwplugin's node agent. Pods are created over
the CRI API with `kubernetes.io/{ingress,egress}-bandwidth` annotations, as the
kubelet creates them; iperf3 measures each direction from its first packet.
Then `bwplugin set` changes the web pod's egress rate live (no restart) and it
is measured again. Then the same pods run under the reference `bandwidth` plugin
in the same setup, for comparison. Everything is removed at the end.

    python -m bench.demo [--seconds 4] [--no-reference]"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from .lab.containerd import Containerd, Traffic, bwplugin_conf, reference_conf
from .lab.measure import TCP_GOODPUT_CEILING

M = 1_000_000
PODS = {  # name: (namespace, annotations)
    "web": ("team-a", {"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "5M"}),
    "db": ("team-b", {"kubernetes.io/ingress-bandwidth": "80M", "kubernetes.io/egress-bandwidth": "40M"}),
    "batch": ("team-b", {"kubernetes.io/egress-bandwidth": "20M"}),
    "plain": ("team-a", {}),
}
LIVE_RATE = "20M"  # web's egress after `bwplugin set`


def quantity(text: str) -> int:
    return int(text[:-1]) * {"k": 10**3, "M": 10**6, "G": 10**9}[text[-1]]


@dataclass
class Row:
    plugin: str
    pod: str
    direction: str
    rate: int  # configured bits/s (0: not annotated)
    traffic: Traffic


def run(shaper: dict[str, object], label: str, seconds: float, agent: bool) -> list[Row]:
    rows: list[Row] = []
    with Containerd(shaper=shaper, agent=agent) as c:
        version = c.cri.version().runtime_version if c.cri else "?"
        print(f"\n== {label}: private containerd {version}, node netns {c.node}")
        sandboxes = {}
        for name, (namespace, annotations) in PODS.items():
            pod = c.run_pod(name, annotations, namespace=namespace)
            sandboxes[name] = pod
            shown = ", ".join(f"{k.split('/')[1]}={v}" for k, v in annotations.items()) or "no annotations"
            print(f"  RunPodSandbox {namespace}/{name} ({shown}): {pod.ip}, host veth {c.host_veth(pod)}")
        for name, (_, annotations) in PODS.items():
            for direction in ("ingress", "egress"):
                value = annotations.get(f"kubernetes.io/{direction}-bandwidth")
                if value is None and name != "plain":
                    continue
                traffic = c.iperf(sandboxes[name], direction, seconds)
                rows.append(Row(label, name, direction, quantity(value) if value else 0, traffic))
        if shaper.get("type") == "bwplugin":
            live = ["set", "--pod", "team-a/web", "--egress", LIVE_RATE]
            print(f"\n$ bwplugin {' '.join(live)}   (a live change: the pod keeps running)")
            out = c.bwplugin(*live, check=True)
            print(out.stdout.rstrip())
            traffic = c.iperf(sandboxes["web"], "egress", seconds)
            rows.append(Row(label, "web*", "egress", quantity(LIVE_RATE), traffic))
            print("\n$ bwplugin stats   (the installed executable, on this node)")
            print(c.bwplugin("stats", check=True).stdout.rstrip())
        for pod in sandboxes.values():
            c.remove_pod(pod)
        print(f"  StopPodSandbox + RemovePodSandbox: {len(sandboxes)} pods removed")
    return rows


def table(rows: list[Row]) -> str:
    head = (
        f"{'plugin':10} {'pod':6} {'direction':9} {'annotated':>10} {'goodput':>11} {'wire':>11} "
        f"{'wire/conf':>9} {'first 1 s':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r.traffic
        conf = f"{r.rate / M:.0f} Mb" if r.rate else "-"
        ratio = f"{t.wire / r.rate:.3f}" if r.rate and t.wire else "-"
        first = f"{t.first_second / r.rate:.2f}×" if r.rate and t.wire else "-"
        lines.append(
            f"{r.plugin:10} {r.pod:6} {r.direction:9} {conf:>10} {t.goodput / M:8.2f} Mb "
            f"{(f'{t.wire / M:8.2f} Mb') if t.wire else '-':>11} {ratio:>9} {first:>10}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4, help="length of each iperf3 run")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference plugin's run")
    parser.add_argument("--no-agent", action="store_true", help="run bwplugin without its node agent")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, tc, bpf, containerd)", file=sys.stderr)
        return 1
    rows = run(bwplugin_conf(), "bwplugin", args.seconds, agent=not args.no_agent)
    if not args.no_reference:
        rows += run(reference_conf(), "reference", args.seconds, agent=False)
    print("\nConfigured (annotation) vs measured, each flow from its first packet:\n")
    print(table(rows))
    print(
        f"\ngoodput: iperf3's receiver; TCP tops out at {TCP_GOODPUT_CEILING:.3f} of the wire rate.\n"
        "wire: bytes the shaping qdisc sent (tc counters), first to last byte; "
        "first 1 s: the same over the first second, as a multiple of the rate.\n"
        f"web*: web's egress after `bwplugin set --egress {LIVE_RATE}` on the running pod (the reference plugin "
        "has no live change: its pods must be recreated).\n"
        "Everything the demo created (containerd, namespaces, veths, ifbs, pins) is removed."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
