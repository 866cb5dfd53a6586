"""`bwplugin stats`: every shaped attachment on this node, from the pinned map's
eBPF counters and the qdiscs' own statistics. A table, JSON, or Prometheus text
exposition for node-exporter's textfile collector.

Counters: the eBPF programs count what is *offered* (before the qdisc), split
into shaped and unshaped traffic per direction; the qdisc counts what it *sent*
and what it dropped. "egress" is traffic from the pod, "ingress" to it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..datapath import bpf, tc
from ..datapath.netlink import Netlink


@dataclass
class QueueStats:
    rate_bps: int  # configured, as the kernel holds it (bits/s)
    sent_bytes: int
    sent_packets: int
    drops: int
    overlimits: int
    backlog_bytes: int
    backlog_packets: int


@dataclass
class DirectionStats:
    shaped_packets: int
    shaped_bytes: int
    unshaped_packets: int
    unshaped_bytes: int
    queue: QueueStats | None  # None: this direction has no rate


@dataclass
class AttachmentStats:
    attach_id: int
    namespace: str  # the Kubernetes pod, from CNI_ARGS ("" when the runtime sent none)
    pod: str
    pod_uid: str
    container_id: str
    ifname: str
    host_veth: str
    ifb: str
    subnets: list[str]
    subnets_mode: str  # "", "shapedSubnets" or "unshapedSubnets"
    egress: DirectionStats
    ingress: DirectionStats
    problems: list[str] = field(default_factory=list)


def _queue(nl: Netlink, index: int) -> QueueStats | None:
    q = tc.root_qdisc(nl, index)
    if not tc.is_our_root(q):
        return None
    assert q is not None
    if q.kind == "tbf":
        state = tc.tbf_state(q)
        rate = state.rate if state else 0
    else:
        shaped = tc.htb_classes(nl, index).get(tc.CLASS_SHAPED)
        rate = shaped.rate if shaped else 0
    s = tc.qdisc_stats(q)
    return QueueStats(rate * 8, s.bytes, s.packets, s.drops, s.overlimits, s.backlog, s.qlen)


def collect(netns: str | None = None) -> list[AttachmentStats]:
    """Every entry of the pinned map, with its devices looked up in the host netns
    (or in `netns`, where a test lab's "node" lives)."""
    map_fd, lpm_fd, pods_fd = bpf.open_map(), bpf.open_lpm(), bpf.open_pods()
    if map_fd is None:
        return []
    out = []
    try:
        pods = bpf.pod_entries(pods_fd) if pods_fd is not None else {}
        with Netlink.in_netns(netns) if netns else Netlink() as nl:
            for attach_id, e in sorted(bpf.attach_entries(map_fd).items()):
                pod = pods.get(attach_id, bpf.PodEntry("", "", ""))
                host = nl.link(index=e.host_index)
                ifb = nl.link(index=e.ifb_index) if e.ifb_index else None
                problems = []
                if host is None or tc.our_classid(nl, host.index) != attach_id:
                    problems.append("host veth does not carry this attachment's filters (stale entry)")
                    host = None
                subnets = bpf.subnets_of(lpm_fd, attach_id) if lpm_fd is not None and e.flags & bpf.F_SUBNETS else []
                mode = ""
                if e.flags & bpf.F_SUBNETS:
                    mode = "unshapedSubnets" if e.flags & bpf.F_LISTED_UNSHAPED else "shapedSubnets"
                out.append(
                    AttachmentStats(
                        attach_id=attach_id,
                        namespace=pod.namespace, pod=pod.name, pod_uid=pod.uid,
                        container_id=e.container_id,
                        ifname=e.ifname,
                        host_veth=host.name if host else "",
                        ifb=ifb.name if ifb else "",
                        subnets=[str(n) for n in subnets],
                        subnets_mode=mode,
                        egress=DirectionStats(
                            e.from_pod_shaped.packets, e.from_pod_shaped.bytes,
                            e.from_pod_unshaped.packets, e.from_pod_unshaped.bytes,
                            _queue(nl, ifb.index) if ifb else None,
                        ),
                        ingress=DirectionStats(
                            e.to_pod_shaped.packets, e.to_pod_shaped.bytes,
                            e.to_pod_unshaped.packets, e.to_pod_unshaped.bytes,
                            _queue(nl, host.index) if host else None,
                        ),
                        problems=problems,
                    )
                )  # fmt: skip
    finally:
        bpf.close_fds(map_fd, lpm_fd, pods_fd)
    return out


# ---------------------------------------------------------------- output


def _rate(bps: int | None) -> str:
    if not bps:
        return "-"
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return str(bps)


def table(rows: Iterable[AttachmentStats]) -> str:
    head = ("NAMESPACE/POD", "CONTAINER", "IF", "HOST VETH", "IFB", "IN RATE", "IN BYTES", "IN DROPS",
            "EG RATE", "EG BYTES", "EG DROPS", "UNSHAPED B (IN/EG)")  # fmt: skip
    lines = [head]
    for r in rows:
        iq, eq = r.ingress.queue, r.egress.queue
        lines.append(
            (
                f"{r.namespace}/{r.pod}" if r.pod else "-", r.container_id[:13], r.ifname, r.host_veth or "?",
                r.ifb or "-",
                _rate(iq.rate_bps if iq else None), str(r.ingress.shaped_bytes), str(iq.drops if iq else "-"),
                _rate(eq.rate_bps if eq else None), str(r.egress.shaped_bytes), str(eq.drops if eq else "-"),
                f"{r.ingress.unshaped_bytes}/{r.egress.unshaped_bytes}",
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(rows: list[AttachmentStats]) -> str:
    """Text exposition format 0.0.4: HELP and TYPE once per metric family."""
    families: dict[str, tuple[str, str, list[str]]] = {}

    def add(name: str, kind: str, help_: str, labels: dict[str, str], value: int) -> None:
        fam = families.setdefault(name, (kind, help_, []))
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        fam[2].append(f"{name}{{{text}}} {value}")

    for r in rows:
        # namespace and pod: the labels Kubernetes dashboards join on
        base = {"namespace": r.namespace, "pod": r.pod, "container_id": r.container_id, "ifname": r.ifname,
                "host_veth": r.host_veth}  # fmt: skip
        for direction, d in (("egress", r.egress), ("ingress", r.ingress)):
            for cls, packets, nbytes in (
                ("shaped", d.shaped_packets, d.shaped_bytes),
                ("unshaped", d.unshaped_packets, d.unshaped_bytes),
            ):
                labels = {**base, "direction": direction, "class": cls}
                add("bwplugin_offered_packets_total", "counter", "Packets seen by the eBPF program.", labels, packets)
                add("bwplugin_offered_bytes_total", "counter", "Bytes seen by the eBPF program.", labels, nbytes)
            q = d.queue
            if q is None:
                continue
            labels = {**base, "direction": direction}
            add("bwplugin_rate_bits_per_second", "gauge", "Configured rate of the shaped class.", labels, q.rate_bps)
            add("bwplugin_qdisc_sent_bytes_total", "counter", "Bytes the qdisc sent.", labels, q.sent_bytes)
            add("bwplugin_qdisc_sent_packets_total", "counter", "Packets the qdisc sent.", labels, q.sent_packets)
            add("bwplugin_qdisc_drops_total", "counter", "Packets the qdisc dropped.", labels, q.drops)
            add("bwplugin_qdisc_overlimits_total", "counter", "Times the qdisc throttled.", labels, q.overlimits)
            add("bwplugin_qdisc_backlog_bytes", "gauge", "Bytes queued now.", labels, q.backlog_bytes)
    out = []
    for name, (kind, help_, samples) in families.items():
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
    out.append("# HELP bwplugin_attachments Shaped attachments on this node.")
    out.append("# TYPE bwplugin_attachments gauge")
    out.append(f"bwplugin_attachments {len(rows)}")
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """The textfile collector may read at any moment: never show it half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bwplugin stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--prometheus", metavar="FILE", help="write Prometheus text exposition to FILE ('-': stdout)")
    args = parser.parse_args(argv)
    rows = collect()
    if args.prometheus == "-":
        sys.stdout.write(prometheus(rows))
    elif args.prometheus:
        write_atomically(Path(args.prometheus), prometheus(rows))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    elif not args.prometheus:
        print(table(rows))
    return 0
