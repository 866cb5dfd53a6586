"""Fault injection for the crash, rollback and soak tests, from outside the product.

The test lab runs `import tests.faults; tests.faults.install()` first in every
plugin process and agent it starts (bench.lab.lab.PRELUDE, set by conftest). It
wraps the steps ADD takes, so that ADD fails, or its process is SIGKILLed, right
after one of them. The step is picked by BWPLUGIN_FAULT=<point>[:kill]: in the
plugin process's environment, or, for an agent (which takes nothing but CNI_*
from a request), in the file its own BWPLUGIN_FAULT_FILE names. Without either,
nothing changes. Lab.set_fault() sets both."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from bwplugin.cni import settings
from bwplugin.cni.errors import IOFailureError
from bwplugin.commands import add, handover
from bwplugin.datapath import probe, tc, tcx
from bwplugin.datapath.netlink import Netlink

POINTS = ("after-map", "after-ingress", "after-ifb-create", "after-ifb", "after-clsact", "after-tcx", "after-filter")


def spec() -> str:
    path = os.environ.get("BWPLUGIN_FAULT_FILE")
    if path and os.path.exists(path):
        with open(path) as fh:
            return fh.read().strip()
    return settings.get("BWPLUGIN_FAULT") or ""


def trigger(point: str) -> None:
    name, _, action = spec().partition(":")
    if name == point:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise IOFailureError(f"injected fault at {point}")


def _after(fn: Callable[..., Any], point_of: Callable[..., str | None]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        point = point_of(*args, **kwargs)
        if point:
            trigger(point)
        return out

    return wrapped


def _point_of_root(nl: Any, index: int, what: str, *args: Any, **kwargs: Any) -> str:
    return "after-ingress" if what == "ingress" else "after-ifb"


def _point_of_create(nl: Any, name: str, kind: str, *args: Any, **kwargs: Any) -> str | None:
    # an attachment's ifb, not the kernel probe's (which lives in a throwaway netns)
    return "after-ifb-create" if kind == "ifb" and name.startswith("bwpl") and name != probe.PROBE_IFB else None


def _point_of_filter(nl: Any, index: int, hook: int, *args: Any, **kwargs: Any) -> str | None:
    return "after-filter" if kwargs.get("prio") == tc.TAIL_PRIO else None  # the redirect


def _point_of_tcx(progs: Any, ifindex: int, owner: int, hook: str) -> str | None:
    return "after-tcx" if hook == "ingress" else None  # both links are pinned


def install() -> None:
    """After each step of ADD has made its object and registered its undo: the map
    entry (with its prefixes and pod), the clsact, each root qdisc, the redirect
    filter, and the from-pod TCX link (the last step on the TCX path, or, through
    the agent, the handover's, after ADD answered). ADD and the handover alone
    sees the wrapped tc (the kernel probes keep the real one)."""
    add._add_entry = _after(add._add_entry, lambda *a, **k: "after-map")
    add.add_root = _after(add.add_root, _point_of_root)
    add._add_clsact = _after(add._add_clsact, lambda *a, **k: "after-clsact")
    # between creating the ifb and labelling it with its alias
    Netlink.create_link = _after(Netlink.create_link, _point_of_create)  # type: ignore[method-assign]
    add.tc = SimpleNamespace(**{**vars(tc), "add_bpf_filter": _after(tc.add_bpf_filter, _point_of_filter)})  # type: ignore[assignment]
    add.tcx = SimpleNamespace(**{**vars(tcx), "attach": _after(tcx.attach, _point_of_tcx)})  # type: ignore[assignment]
    # through the agent, the TCX links are the handover's (after ADD answered)
    handover.tcx = SimpleNamespace(**{**vars(tcx), "attach": _after(tcx.attach, _point_of_tcx)})  # type: ignore[assignment]
    # "redirect-ignored": the once-per-boot redirect probe sends its frames through a
    # program that never redirects, so they never reach its ifb, as on a kernel
    # before 6.4; the decision that follows (act_mirred) is the product's own
    real_probe = probe.redirect_honoured

    def redirect_honoured(progs: Any, program: str = "bwp_from_pod") -> bool:
        return real_probe(progs, "bwp_to_pod" if spec() == "redirect-ignored" else program)

    probe.redirect_honoured = redirect_honoured
