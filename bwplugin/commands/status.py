"""STATUS (CNI 1.1): can this node shape pods?"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..cni.errors import BPFUnavailableError, NotAvailableError
from ..datapath import bpf, probe


def status_problems(kinds: tuple[str, ...] = ("tbf", "htb", "clsact")) -> list[str]:
    """What stops this node from shaping. Runtimes poll STATUS: it changes nothing
    (no bpffs mount: the first ADD does that) and probes the kernel's kinds once
    per boot and program version."""
    problems = []
    try:
        bpf.libbpf()
    except BPFUnavailableError as exc:  # every bpf(2) call goes through it
        return [exc.msg]
    progs = bpf.open_pinned() if os.path.ismount(bpf.BPFFS) else None
    if progs is None:
        # first ADD will compile: it needs bcc and kernel headers
        if importlib.util.find_spec("bcc") is None:
            problems.append("bcc (python3-bpfcc) is not installed and no compiled program is pinned")
        build = Path(f"/lib/modules/{os.uname().release}/build")
        if not build.exists():
            problems.append(f"kernel headers are missing ({build}) and no compiled program is pinned")
    try:
        missing = probe.missing_kinds_cached(kinds, progs)
    except OSError as exc:
        missing = [f"(the probe itself failed: {exc})"]
    finally:
        if progs is not None:
            progs.close()
    if missing:
        problems.append("the kernel lacks " + ", ".join(missing))
    return problems


def cmd_status() -> None:
    problems = status_problems()
    if problems:
        raise NotAvailableError("bwplugin cannot shape pods on this node: " + "; ".join(problems))
