"""The eBPF programs' own cost, from the kernel's run-time statistics.

BPF_ENABLE_STATS turns on run_time_ns/run_cnt accounting for as long as the fd it
returns stays open (the kernel counts the holders; closing restores what was there),
so nothing is left switched on after a run. While it is held every program on the
machine pays for the two clock reads, ours and any other's: benchmark-only.
The counters are read with bpftool, not with bwplugin's own code."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from bwplugin.datapath.bpf import libbpf

BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def run_time_stats() -> Iterator[None]:
    fd = libbpf().bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        err = ctypes.get_errno() or -fd
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProgRuns:
    run_time_ns: int
    run_cnt: int


def snapshot(prefix: str = "bwp_") -> dict[int, ProgRuns]:
    """Every loaded program whose name starts with prefix, by id."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {
        int(p["id"]): ProgRuns(int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0)))
        for p in json.loads(out)
        if str(p.get("name", "")).startswith(prefix)
    }


def spent(before: dict[int, ProgRuns], after: dict[int, ProgRuns]) -> tuple[int, int]:
    """(ns, runs) the programs spent between two snapshots."""
    ns = runs = 0
    for pid, now in after.items():
        was = before.get(pid, ProgRuns(0, 0))
        ns += now.run_time_ns - was.run_time_ns
        runs += now.run_cnt - was.run_cnt
    return ns, runs
