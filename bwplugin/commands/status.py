"""STATUS (CNI 1.1): can this node shape pods?"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..cni.errors import BPFUnavailableError, NotAvailableError
from ..datapath import bpf, probe


def status_problems(kinds: tuple[str, ...] = ("tbf", "htb", "clsact")) -> list[str]:
    problems = []
    if not os.path.ismount(bpf.BPFFS):
        try:
            bpf.ensure_bpffs()
        except BPFUnavailableError as exc:
            problems.append(exc.msg)
    progs = bpf.open_pinned()
    if progs is None:
        # first ADD will compile: it needs bcc and kernel headers
        if importlib.util.find_spec("bcc") is None:
            problems.append("bcc (python3-bpfcc) is not installed and no compiled program is pinned")
        build = Path(f"/lib/modules/{os.uname().release}/build")
        if not build.exists():
            problems.append(f"kernel headers are missing ({build}) and no compiled program is pinned")
    try:
        missing = probe.missing_kinds(kinds, progs)
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
