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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
    source: str = ""  # where the rate in force came from: "runtime" (ADD) or "override" (a live change)


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
    live_changes: int = 0
    problems: list[str] = field(default_factory=list)


def _queue(nl: Netlink, index: int) -> QueueStats | None:
    q = tc.root_qdisc(nl, index)
    if not tc.is_our_root(q):
        return None
    assert q is not None
    if q.kind == "tbf":
        state = tc.tbf_state(q)
        rate = state.rate if state else 0
    else:  # the shaped class's TBF leaf holds the rate (a legacy build's class itself)
        leaf = tc.shaped_leaf(nl, index)
        state = tc.tbf_state(leaf) if leaf is not None else None
        shaped = tc.htb_classes(nl, index).get(tc.CLASS_SHAPED) if state is None else None
        rate = state.rate if state else shaped.rate if shaped else 0
    s = tc.qdisc_stats(q)
    return QueueStats(rate * 8, s.bytes, s.packets, s.drops, s.overlimits, s.backlog, s.qlen)


def collect(netns: str | None = None) -> list[AttachmentStats]:
    """Every entry of the pinned map, with its devices looked up in the host netns
    (or in `netns`, where a test lab's "node" lives)."""
    map_fd, lpm_fd, pods_fd, shaping_fd = bpf.open_map(), bpf.open_lpm(), bpf.open_pods(), bpf.open_shaping()
    if map_fd is None:
        bpf.close_fds(lpm_fd, pods_fd, shaping_fd)
        return []
    out = []
    try:
        pods = bpf.pod_entries(pods_fd) if pods_fd is not None else {}
        shaping = bpf.shaping_entries(shaping_fd) if shaping_fd is not None else {}
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
                rec = shaping.get(attach_id)
                flags = rec.flags if rec else 0
                in_src, eg_src = ("" if rec is None else "override" if flags & bit else "runtime"
                                  for bit in (bpf.S_INGRESS_OVERRIDE, bpf.S_EGRESS_OVERRIDE))  # fmt: skip
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
                            _queue(nl, ifb.index) if ifb else None, eg_src,
                        ),
                        ingress=DirectionStats(
                            e.to_pod_shaped.packets, e.to_pod_shaped.bytes,
                            e.to_pod_unshaped.packets, e.to_pod_unshaped.bytes,
                            _queue(nl, host.index) if host else None, in_src,
                        ),
                        live_changes=rec.changes if rec else 0,
                        problems=problems,
                    )
                )  # fmt: skip
    finally:
        bpf.close_fds(map_fd, lpm_fd, pods_fd, shaping_fd)
    return out


# ---------------------------------------------------------------- output


def _rate(bps: int | None, source: str = "") -> str:
    """10M, or 10M* when a live change set it."""
    if not bps:
        return "-"
    mark = "*" if source == "override" else ""
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}{mark}"
    return f"{bps}{mark}"


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
                _rate(iq.rate_bps if iq else None, r.ingress.source), str(r.ingress.shaped_bytes),
                str(iq.drops if iq else "-"),
                _rate(eq.rate_bps if eq else None, r.egress.source), str(r.egress.shaped_bytes),
                str(eq.drops if eq else "-"),
                f"{r.ingress.unshaped_bytes}/{r.egress.unshaped_bytes}",
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    if any("override" in (r.ingress.source, r.egress.source) for r in rows):
        text += "\n* set live (bwplugin set or the annotation watch), not what the runtime gave at ADD"
    return text


LABELS = ["namespace", "pod", "container_id", "ifname", "host_veth", "direction"]


def families(rows: Iterable[AttachmentStats]) -> Iterator[Metric]:
    """The per-attachment metric families, for `stats --prometheus` and the agent's
    /metrics alike. `namespace` and `pod` are the labels Kubernetes dashboards join
    on; rates are in bytes per second, Prometheus's base unit."""
    rows = list(rows)
    offered_packets = CounterMetricFamily(
        "bwplugin_offered_packets", "Packets seen by the eBPF programs, before the qdisc.", labels=[*LABELS, "class"]
    )
    offered_bytes = CounterMetricFamily(
        "bwplugin_offered_bytes", "Bytes seen by the eBPF programs, before the qdisc.", labels=[*LABELS, "class"]
    )
    rate = GaugeMetricFamily("bwplugin_rate_bytes_per_second", "Configured rate of the shaped class.", labels=LABELS)
    sent_bytes = CounterMetricFamily("bwplugin_qdisc_sent_bytes", "Bytes the shaping qdisc sent.", labels=LABELS)
    sent_packets = CounterMetricFamily("bwplugin_qdisc_sent_packets", "Packets the shaping qdisc sent.", labels=LABELS)
    drops = CounterMetricFamily("bwplugin_qdisc_drops", "Packets the shaping qdisc dropped.", labels=LABELS)
    overlimits = CounterMetricFamily("bwplugin_qdisc_overlimits", "Times the shaping qdisc throttled.", labels=LABELS)
    backlog = GaugeMetricFamily("bwplugin_qdisc_backlog_bytes", "Bytes queued in the shaping qdisc now.", labels=LABELS)
    overridden = GaugeMetricFamily(
        "bwplugin_rate_overridden", "1 if a live change set this direction's rate, 0 if ADD's holds.", labels=LABELS
    )
    changes = CounterMetricFamily(
        "bwplugin_live_changes", "Live changes applied to the attachment.", labels=LABELS[:-1]
    )
    for r in rows:
        changes.add_metric([r.namespace, r.pod, r.container_id, r.ifname, r.host_veth], r.live_changes)
        for direction, d in (("egress", r.egress), ("ingress", r.ingress)):
            labels = [r.namespace, r.pod, r.container_id, r.ifname, r.host_veth, direction]
            for cls, packets, nbytes in (
                ("shaped", d.shaped_packets, d.shaped_bytes),
                ("unshaped", d.unshaped_packets, d.unshaped_bytes),
            ):
                offered_packets.add_metric([*labels, cls], packets)
                offered_bytes.add_metric([*labels, cls], nbytes)
            q = d.queue
            if q is None:
                continue
            rate.add_metric(labels, q.rate_bps // 8)
            overridden.add_metric(labels, int(d.source == "override"))
            sent_bytes.add_metric(labels, q.sent_bytes)
            sent_packets.add_metric(labels, q.sent_packets)
            drops.add_metric(labels, q.drops)
            overlimits.add_metric(labels, q.overlimits)
            backlog.add_metric(labels, q.backlog_bytes)
    attachments = GaugeMetricFamily("bwplugin_attachments", "Shaped attachments on this node.")
    attachments.add_metric([], len(rows))
    yield from (offered_packets, offered_bytes, rate, overridden, sent_bytes, sent_packets, drops, overlimits, backlog,
                changes, attachments)  # fmt: skip


class NodeCollector:
    """A prometheus_client collector of `rows()`, called at each collection. The
    agent's default reads the kernel at scrape time: nothing is cached."""

    def __init__(self, rows: Callable[[], list[AttachmentStats]] = collect) -> None:
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        return families(self.rows())


def prometheus(rows: list[AttachmentStats]) -> str:
    """Text exposition format, written by prometheus_client."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(lambda: rows))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


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
