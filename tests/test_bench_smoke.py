"""The benchmark runs end to end (smoke profile) and writes well-formed output.
It asserts nothing about speed or accuracy: those are bench/'s job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.run import run

pytestmark = pytest.mark.kernel


def test_bench_smoke_weak_by_design_only_runs_every_section_and_writes_its_reports(tmp_path: Path) -> None:
    result = run("smoke", tmp_path)
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["meta"]["profile"] == "smoke" and doc["meta"]["kernel"]
    for section in ("accuracy", "bursts", "latency", "fairness", "subnets"):
        assert {row["plugin"] for row in doc[section]} == {"bwplugin", "reference"}, section
    costed = {row["plugin"] for row in doc["cost"] if "del_ms" in row}
    assert costed == {"bwplugin (agent)", "bwplugin (forwarder)", "bwplugin (no agent)", "reference"}
    for row in doc["accuracy"]:
        assert row["wire_bps"] > 0 and 0 < row["wire_ratio"] < 10, row
    for row in doc["bursts"]:
        assert row["bytes_1s"] > 0 and row["curve"], {k: v for k, v in row.items() if k != "curve"}
    for row in doc["latency"]:
        # NaN only when every ping under load was lost: a result, not a malformed row
        assert row["loaded_p50_ms"] > 0 or (math.isnan(row["loaded_p50_ms"]) and row["ping_loss"] == 1.0), row
    for row in doc["fairness"]:
        assert 0 < row["jain"] <= 1.0 + 1e-9, row
    for row in doc["subnets"]:
        assert row["goodput_bps"] > 0 and row["destination"] in ("shaped peer", "unshaped peer"), row
    assert {(row["mode"], row["direction"]) for row in doc["subnet_mode"]} == {
        (m, d) for m in ("plain", "subnets") for d in ("egress", "ingress")
    }
    for row in doc["subnet_mode"]:
        assert row["goodput_ratio"] > 0 and (row["loaded_p99_ms"] > 0 or row["ping_loss"] == 1.0), row
    for row in doc["cost"]:
        assert len(row["add_ms"]) >= 1 and all(x > 0 for x in row["add_ms"]), row
    paths = {(row["measure"], row["path"]) for row in doc["attach"]}
    assert paths == {(m, p) for m in ("accuracy", "cost") for p in ("tcx", "tc")}, paths
    for row in doc["attach"]:
        if row["measure"] == "accuracy":
            assert 0 < row["wire_ratio"] < 10, row
        else:
            assert len(row["add_ms"]) == len(row["del_ms"]) == 2 and min(row["add_ms"] + row["del_ms"]) > 0, row
    # datapath: every shaper at both directions, bwplugin once more with its eBPF stats
    runs = {(row["shaper"], row["direction"], row["bpf_stats"]) for row in doc["datapath"]}
    assert runs == {(s, d, False) for s in ("none", "bwplugin", "reference") for d in ("egress", "ingress")} | {
        ("bwplugin", d, True) for d in ("egress", "ingress")
    }, runs
    for row in doc["datapath"]:
        assert row["us_per_packet"] > 0 and 0.5 < row["delivered_ratio"] <= 1.01, row
        assert (row["bpf_ns_per_packet"] > 0) == row["bpf_stats"], row  # NaN compares False
    md = (tmp_path / "smoke.md").read_text()
    for heading in (
        "Steady-state accuracy",
        "Burst conformance",
        "Latency under load",
        "Fairness",
        "Unshaped subnets",
        "Subnet mode against plain mode",
        "Cost of ADD",
        "TCX links vs cls_bpf filters",
        "Datapath cost",
    ):
        assert heading in md
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["meta"]["seconds"] > 0
