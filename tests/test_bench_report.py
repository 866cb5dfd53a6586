"""The benchmark report's pure parts (no root, no kernel): how the datapath table
turns rounds into overheads and when it refuses a ratio."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from bench import report


def _row(shaper: str, repeat: int, us: float, *, stats: bool = False, bpf: float = float("nan")) -> dict[str, Any]:
    return {
        "shaper": shaper,
        "bpf_stats": stats,
        "proto": "udp",
        "load_bps": 64 * 8 * 100_000,  # 100 kpps of 64-byte payloads
        "length": 64,
        "direction": "egress",
        "repeat": repeat,
        "us_per_packet": us,
        "ms_per_gbit": us,
        "bpf_ns_per_packet": bpf,
    }


def _line(table: str) -> list[str]:
    body = [ln for ln in table.splitlines() if ln.startswith("| UDP")]
    assert len(body) == 1, table
    return [c.strip() for c in body[0].strip("|").split("|")]


def test_overheads_are_taken_within_each_round_and_the_stats_run_is_left_out() -> None:
    # the machine drifts by 5 us between rounds; within each, bwplugin costs 1 over
    # none and the reference 2: the ratio must be 0.5 whatever the drift
    rows = []
    for rep, base in enumerate((10.0, 15.0, 20.0)):
        rows += [_row("none", rep, base), _row("bwplugin", rep, base + 1), _row("reference", rep, base + 2)]
    rows.append(_row("bwplugin", 0, 99.0, stats=True, bpf=250.0))  # slower with its clock reads: not timed
    cells = _line(report.datapath_table(rows))
    assert cells[0] == "UDP 64 B at 100 kpps"
    assert cells[6:9] == ["1.00", "2.00", "0.50"], cells
    assert cells[9] == "250", cells
    assert cells[4] == "16.00", cells  # median of 11, 16, 21: the stats run's 99 is not in it


def test_no_ratio_where_the_reference_overhead_is_within_the_noise() -> None:
    # the reference's overhead over its rounds: -1, 0.5, 3 (median 0.5, half-range 2)
    rows = []
    for rep, (base, ref) in enumerate(((10.0, -1.0), (12.0, 0.5), (14.0, 3.0))):
        rows += [_row("none", rep, base), _row("bwplugin", rep, base + 0.5), _row("reference", rep, base + ref)]
    cells = _line(report.datapath_table(rows))
    assert cells[8] == "– (noise ±2.00)", cells


def test_a_plot_of_one_section_draws_no_empty_legends(tmp_path: Path) -> None:
    result = {
        "meta": {"profile": "quick", "date": "today", "machine": "test"},
        "datapath": [_row("none", 0, 10.0)],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels" on an empty legend
        report.plot(result, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
