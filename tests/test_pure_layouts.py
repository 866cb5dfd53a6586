"""Pure parts of the eBPF and stats plumbing: the map layouts the C code shares
with Python, and the stats output formats. No root needed."""

from __future__ import annotations

import re
import shutil
import subprocess
from ipaddress import ip_network
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bwplugin.commands.stats import AttachmentStats, DirectionStats, QueueStats, prometheus, table
from bwplugin.datapath import bpf

C_SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "bwplugin.c"


def test_attach_entry_round_trips_and_matches_the_c_struct():
    e = bpf.AttachEntry(
        7, 9, bpf.F_EGRESS_SHAPED | bpf.F_SUBNETS, 2**63 + 5, 42, "eth0", "c" * 200,
        bpf.Counter(1, 2), bpf.Counter(3, 4), bpf.Counter(5, 6), bpf.Counter(7, 8),
    )  # fmt: skip
    raw = e.pack()
    assert len(raw) == bpf.VAL.size == 4 * 4 + 2 * 8 + 4 * 16 + 16 + 128
    back = bpf.AttachEntry.unpack(raw)
    assert back == bpf.AttachEntry(**{**e.__dict__, "container_id": "c" * bpf.CID_MAX})
    # the C struct declares the same fields in the same order and sizes
    src = C_SOURCE.read_text()
    assert "char ifname[16];" in src and "char container_id[128];" in src
    flags = dict(re.findall(r"#define (F_\w+)\s+(\d+)", src))
    assert {k: int(v) for k, v in flags.items()} == {
        "F_EGRESS_SHAPED": bpf.F_EGRESS_SHAPED,
        "F_INGRESS_SHAPED": bpf.F_INGRESS_SHAPED,
        "F_SUBNETS": bpf.F_SUBNETS,
        "F_LISTED_UNSHAPED": bpf.F_LISTED_UNSHAPED,
        "F_COUNT_TO_POD": bpf.F_COUNT_TO_POD,
        "F_COUNT_FROM_POD": bpf.F_COUNT_FROM_POD,
    }


def test_lpm_keys_put_the_id_and_family_before_the_prefix():
    k4 = bpf.lpm_key(513, ip_network("10.1.0.0/16"))
    assert len(k4) == bpf.LPM_KEY.size == 24
    assert bpf.LPM_KEY.unpack(k4) == (32 + 16, 513, 4, bytes([10, 1]) + b"\0" * 14)
    k6 = bpf.lpm_key(1, ip_network("fd00::/8"))
    assert bpf.LPM_KEY.unpack(k6)[:3] == (32 + 8, 1, 6)


def _row(cid: str = 'c"1') -> AttachmentStats:
    q = QueueStats(rate_bps=10_000_000, sent_bytes=1000, sent_packets=10, drops=3, overlimits=4, backlog_bytes=0,
                   backlog_packets=0)  # fmt: skip
    return AttachmentStats(
        attach_id=5, namespace="ns-a", pod="pod-1", pod_uid="u-1", container_id=cid, ifname="eth0",
        host_veth="veth1", ifb="bwplabc",
        subnets=[], subnets_mode="",
        egress=DirectionStats(13, 1300, 0, 0, q), ingress=DirectionStats(1, 60, 2, 80, None),
    )  # fmt: skip


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The exposition, parsed by prometheus_client's own parser (label order and
    number formatting differ between its versions)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_exposition_is_well_formed():
    text = prometheus([_row(), _row("other")])
    lines = text.splitlines()
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? [0-9.e+]+$')
    for line in lines:
        assert line.startswith("# ") or sample.match(line), line
    # each family's HELP and TYPE appear once, before its samples
    assert text.count("# TYPE bwplugin_offered_bytes_total counter") == 1
    assert 'container_id="c\\"1"' in text  # label values are escaped
    got = samples(text)
    base = {"namespace": "ns-a", "pod": "pod-1", "container_id": "other", "ifname": "eth0", "host_veth": "veth1"}
    assert got[("bwplugin_qdisc_drops_total", frozenset({**base, "direction": "egress"}.items()))] == 3
    # the base unit is bytes: 10 Mbit/s is 1.25 MB/s
    assert got[("bwplugin_rate_bytes_per_second", frozenset({**base, "direction": "egress"}.items()))] == 1.25e6
    assert got[("bwplugin_attachments", frozenset())] == 2
    assert not any(name.startswith("bwplugin_qdisc") and ("direction", "ingress") in labels for name, labels in got)


def test_table_has_one_row_per_attachment():
    out = table([_row(), _row("x")]).splitlines()
    assert len(out) == 3 and out[0].startswith("NAMESPACE/POD")
    assert out[1].startswith("ns-a/pod-1 ")
    assert "10M" in out[1] and "2/0" not in out[1] and "80/0" in out[1]


def test_prometheus_names_pass_promtool():
    """promtool (Debian's prometheus package, installed by scripts/setup.sh) lints
    names, units and types as Prometheus's conventions want them."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup.sh installs Debian's prometheus package"
    out = subprocess.run(
        [promtool, "check", "metrics"], input=prometheus([_row(), _row("x")]), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", (out.stdout, out.stderr)
