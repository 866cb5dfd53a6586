"""The agent's handover of an attachment's counting from cls_bpf filters to TCX
links, after ADD has answered.

Each TCX attach waits for an RCU grace period under the rtnl lock (~13 ms here,
two per pod), which would double ADD's time. So through the agent, ADD counts
with the cls_bpf filters (a complete, CHECK-clean attachment, recorded as
S_TCX_PENDING) and the agent then, on a thread of its own:

1. attaches the TCX links at the head of both hooks; their programs classify
   but do not count yet (the veth's claim lacks TCX_COUNTS);
2. sets TCX_COUNTS in the claim: one atomic write, from which the TCX programs
   count and tag each packet they counted, and the cls_bpf counters skip exactly
   the tagged ones (bpf/bwplugin.c), so no packet is counted twice or missed;
3. deletes the cls_bpf counting filters, then records S_TCX.

Every step is safe to redo after a crash (the agent's next start resumes what
is pending), and it runs under the live-change lock, which DEL, CHECK and GC of
a pending attachment also take, so none of them sees it half-moved."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

from ..cni.settings import log
from ..datapath import bpf, tc, tcx
from ..datapath.netlink import Netlink

LOCK = "set.lock"  # the live-change lock: a handover rewrites the record as `bwplugin set` does
COUNTERS = {"egress": (tc.CLSACT_EGRESS, "bwp_to_pod"), "ingress": (tc.CLSACT_INGRESS, "bwp_count_from_pod")}


@dataclass(frozen=True)
class Handover:
    attach_id: int
    owner: int
    host_index: int


def pending() -> list[Handover]:
    """Attachments whose counting still waits for its handover (the agent's start)."""
    map_fd, shaping_fd = bpf.open_map(), bpf.open_shaping()
    try:
        if map_fd is None or shaping_fd is None:
            return []
        entries = bpf.attach_entries(map_fd)
        return [
            Handover(i, entries[i].owner, entries[i].host_index)
            for i, rec in bpf.shaping_entries(shaping_fd).items()
            if rec.flags & bpf.S_TCX_PENDING and i in entries
        ]
    finally:
        bpf.close_fds(map_fd, shaping_fd)


@contextlib.contextmanager
def settled(attach_ids: list[int]) -> Iterator[None]:
    """Held by DEL, CHECK and GC: if any of these attachments is pending, wait for
    a handover in progress to finish (a pending record can only become settled;
    only ADD makes one)."""
    fd = bpf.open_shaping()
    try:
        waiting = fd is not None and any(
            (rec := bpf.shaping_get(fd, i)) is not None and rec.flags & bpf.S_TCX_PENDING for i in attach_ids
        )
    finally:
        bpf.close_fds(fd)
    if not waiting:
        yield
        return
    with bpf.node_lock(name=LOCK):
        yield


def run(item: Handover) -> str:
    """Move one attachment's counting to TCX links; returns what was done."""
    with bpf.node_lock(name=LOCK), Netlink() as nl:
        progs = bpf.open_pinned()
        if progs is None:
            return "skipped: no programs pinned"
        try:
            return _move(nl, progs, item)
        finally:
            progs.close()


def _move(nl: Netlink, progs: bpf.Programs, item: Handover) -> str:
    entry = bpf.attach_get(progs.map_fd, item.attach_id)
    rec = bpf.shaping_get(progs.shaping_fd, item.attach_id)
    if entry is None or rec is None or (entry.owner, entry.host_index) != (item.owner, item.host_index):
        return "skipped: the attachment is gone"
    if not rec.flags & bpf.S_TCX_PENDING:
        return "skipped: already settled"
    ours = tc.our_filters(nl, item.host_index)
    counters = {hook: ours.get((h, tc.FRONT_PRIO)) for hook, (h, _prog) in COUNTERS.items()}
    current = all(
        f is None or (f.classid == item.attach_id and f.name == progs.filter_name(COUNTERS[hook][1]))
        for hook, f in counters.items()
    )
    claim = bpf.tcx_claim_of(progs.tcx_fd, item.host_index)
    if not current or claim != item.attach_id:
        # counters of another build know no handover; a lost claim, no TCX: stay on cls_bpf
        bpf.shaping_set(progs.shaping_fd, item.attach_id, replace(rec, flags=rec.flags & ~bpf.S_TCX_PENDING))
        return "kept on cls_bpf: " + ("counters of another build" if not current else "the veth is not claimed")
    links = tcx.pinned(item.owner)
    try:
        for hook in tcx.HOOKS:
            link = links.get(hook)
            if link is None or link.info is None or link.info.ifindex != item.host_index:
                tcx.attach(progs, item.host_index, item.owner, hook)  # replaces a stale pin of this owner
        bpf.tcx_count(progs.tcx_fd, item.host_index, item.attach_id)
    except Exception as exc:  # noqa: BLE001 (whatever failed, the cls_bpf counters are still there)
        _undo(progs, item)
        bpf.shaping_set(progs.shaping_fd, item.attach_id, replace(rec, flags=rec.flags & ~bpf.S_TCX_PENDING))
        log(f"attachment {item.attach_id}: moving its counting to TCX failed ({exc}); it stays on cls_bpf")
        return "kept on cls_bpf: " + str(exc)
    for hook, f in counters.items():
        if f is not None:
            tc.delete_our_filter(nl, item.host_index, COUNTERS[hook][0], tc.FRONT_PRIO, item.attach_id)
    flags = rec.flags & ~bpf.S_TCX_PENDING | bpf.S_TCX
    bpf.shaping_set(progs.shaping_fd, item.attach_id, replace(rec, flags=flags))
    return "moved to TCX"


def _undo(progs: bpf.Programs, item: Handover) -> None:
    with contextlib.suppress(OSError):  # the cls_bpf counters count everything again, then the links go
        bpf.tcx_count(progs.tcx_fd, item.host_index, item.attach_id, counts=False)
    with contextlib.suppress(OSError):
        tcx.detach(item.owner)
