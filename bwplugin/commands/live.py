"""`bwplugin set`: change a running attachment's shaping in place, without
touching the pod. Rates and buckets are changed on the existing qdiscs (their
queues and the pod's connections survive); a direction shaped anew gets its
qdisc (and ifb) before the programs are told to steer into it; a direction
lifted is first un-steered, then its objects go. The attachment's record
(bpf.ShapingEntry) keeps the values in force, so CHECK, stats and DEL know."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from ..cni.change import Change, DirectionChange, Selector
from ..cni.config import Direction, Policy, Subnets
from ..cni.errors import ContainerUnknownError, ForeignObjectError, InvalidConfigError
from ..cni.settings import log
from ..datapath import bpf, probe, tc
from ..datapath.naming import IfbLabel, ifb_name_of_owner, network_tag_of
from ..datapath.netlink import Link, Netlink
from ..datapath.shaping import TBFParams, tbf_params
from .add import add_ifb, add_root
from .common import HostVeth, Undo, direction_of, recorded_redirect

# what a direction shaped anew gets when no burst is given: the runtimes' own
# default (containerd's), which maxBurstMs then caps to a few ms at the rate
DEFAULT_BURST = 4294967295
DIRECTIONS = (("ingress", bpf.INGRESS, bpf.S_INGRESS_OVERRIDE), ("egress", bpf.EGRESS, bpf.S_EGRESS_OVERRIDE))


@dataclass(frozen=True)
class Target:
    attach_id: int
    entry: bpf.AttachEntry
    pod: bpf.PodEntry
    host: Link


def cmd_set(change: Change) -> dict[str, Any]:
    with Netlink() as nl:
        progs = bpf.open_pinned()
        if progs is None:
            raise ContainerUnknownError(
                f"no attachment matches {change.selector.describe()}: nothing is pinned under {bpf.pin_dir()} "
                "(no pod on this node is shaped by bwplugin)"
            )
        try:
            # one live change at a time (the CLI and the annotation watch); not the
            # compile lock, which the redirect probe below takes for itself
            with bpf.node_lock(name="set.lock"):
                target = resolve(nl, progs, change.selector)
                old = bpf.shaping_get(progs.shaping_fd, target.attach_id) or _legacy(target)
                new = plan(old, target.entry, change)
                if new.now != old.now or new.subnets_digest != old.subnets_digest or new.flags != old.flags:
                    apply(nl, progs, target, old, new, change.subnets)
                    new = replace(new, changes=old.changes + 1)
                    bpf.shaping_set(progs.shaping_fd, target.attach_id, new)
                    changed = True
                else:
                    changed = False
                return describe(nl, progs, target, new, changed, change.origin)
        finally:
            progs.close()


def resolve(nl: Netlink, progs: bpf.Programs, sel: Selector) -> Target:
    """Exactly one attachment whose every given field matches, and whose veth
    still carries its filters (an entry without them is stale, not a target)."""
    pods = bpf.pod_entries(progs.pods_fd)
    matches = []
    for attach_id, entry in bpf.attach_entries(progs.map_fd).items():
        pod = pods.get(attach_id, bpf.PodEntry("", "", ""))
        if sel.pod and (pod.namespace, pod.name) != (sel.namespace, sel.pod):
            continue
        if sel.container and not entry.container_id.startswith(sel.container):
            continue
        if sel.ifname and entry.ifname != sel.ifname:
            continue
        host = nl.link(index=entry.host_index)
        if host is None or (sel.veth and host.name != sel.veth) or tc.our_classid(nl, host.index) != attach_id:
            continue
        matches.append(Target(attach_id, entry, pod, host))
    if not matches:
        raise ContainerUnknownError(f"no attachment shaped by bwplugin matches {sel.describe()}")
    if len(matches) > 1:
        found = "; ".join(
            f"{m.pod.namespace}/{m.pod.name} container {m.entry.container_id[:13]} if {m.entry.ifname}" for m in matches
        )
        raise InvalidConfigError(
            f"{len(matches)} attachments match {sel.describe()}: {found}; add --ifname or --container to choose one"
        )
    return matches[0]


def _legacy(target: Target) -> bpf.ShapingEntry:
    """An attachment made before records were kept has no policy to size new queues with."""
    raise InvalidConfigError(
        f"attachment {target.attach_id} ({target.entry.container_id[:13]}) was made by an older bwplugin that kept "
        "no shaping record: recreate the pod to change it live"
    )


def _direction(old: tuple[int, int], add: tuple[int, int], dc: DirectionChange, what: str) -> tuple[int, int]:
    if dc.rate == 0:
        return (0, 0)
    rate, burst = old
    if dc.rate is not None:
        rate = dc.rate
    if rate == 0:
        raise InvalidConfigError(f"{what}Burst is given but {what} is not shaped: give {what} too")
    if dc.burst is not None:
        burst = dc.burst
    elif burst == 0:
        burst = add[1] or DEFAULT_BURST
    return (rate, burst)


def plan(old: bpf.ShapingEntry, entry: bpf.AttachEntry, change: Change) -> bpf.ShapingEntry:
    """The record after the change (pure: nothing is touched yet). A direction
    is overridden exactly while its values differ from ADD's."""
    if change.origin == "watch" and old.flags & bpf.S_STATIC:
        return old  # the conflist's own rates won over the annotations at ADD; they still do
    now = list(old.add if change.reset else old.now)
    flags = old.flags
    for what, i, bit in DIRECTIONS:
        dc = getattr(change, what)
        if dc.given:
            now[i] = _direction(old.now[i], old.add[i], dc, what)
        flags = flags | bit if now[i] != old.add[i] else flags & ~bit
    digest = old.subnets_digest
    if change.subnets is not None:
        if not entry.flags & bpf.F_SUBNETS:
            raise InvalidConfigError(
                f"{change.subnets.key} can change live only on an attachment made with subnets (an HTB); "
                "this one has a plain TBF: recreate the pod with shapedSubnets or unshapedSubnets"
            )
        digest = bpf.subnets_digest(change.subnets.networks)
        flags |= bpf.S_SUBNETS_OVERRIDE
        flags = flags | bpf.S_SHAPED_LIST if change.subnets.listed_shaped else flags & ~bpf.S_SHAPED_LIST
    return replace(old, now=(now[0], now[1]), subnets_digest=digest, flags=flags)


def _policy(rec: bpf.ShapingEntry) -> Policy:
    return Policy(rec.latency_us / 1000, rec.max_burst_us / 1000, recorded_redirect(rec.flags))


def apply(
    nl: Netlink, progs: bpf.Programs, t: Target, old: bpf.ShapingEntry, new: bpf.ShapingEntry, subnets: Subnets | None
) -> None:
    """Three phases, so that no packet is ever steered at something missing:
    create or change what stays shaped, switch the programs over (one map write),
    then remove what no longer shapes anything."""
    policy = _policy(new)
    host = HostVeth(t.host.index, t.host.name, new.mtu or t.host.mtu or 1500, new.gso_max or 65536)
    split = Subnets(not t.entry.flags & bpf.F_LISTED_UNSHAPED, ()) if t.entry.flags & bpf.F_SUBNETS else None
    if subnets is not None:
        split = subnets
    ifb_name = ifb_name_of_owner(t.entry.owner)
    ifb = nl.link(name=ifb_name) if t.entry.ifb_index else None
    flags, ifb_index = t.entry.flags, t.entry.ifb_index
    undo = Undo()
    try:
        for what, i, _bit in DIRECTIONS:
            before, after = direction_of(old.now[i]), direction_of(new.now[i])
            if after is None:
                continue  # unshaped, or lifted (below, once nothing steers into it)
            flags |= bpf.F_INGRESS_SHAPED if i == bpf.INGRESS else bpf.F_EGRESS_SHAPED
            if what == "egress" and ifb is None:  # shaped anew: an ifb, its qdisc, then the steering
                label = IfbLabel(
                    network_tag_of(t.entry.network), t.attach_id, host.index, t.entry.ifname, t.entry.container_id
                )
                ifb = add_ifb(nl, ifb_name, label, host.mtu, undo)
                add_root(nl, ifb.index, what, after, policy, split, host, undo)
                ifb_index = ifb.index
                _steer_egress(nl, progs, t, policy, ifb.index, undo)
            elif before is None:
                _claim_root(nl, host.index, host.name)
                add_root(nl, host.index, what, after, policy, split, host, undo)
            elif before != after:
                index = host.index if i == bpf.INGRESS else ifb_index
                _change_root(nl, index, before, after, policy, split, host, undo)
        if subnets is not None:
            _replace_subnets(progs, t.attach_id, subnets)
            flags = flags & ~bpf.F_LISTED_UNSHAPED | (0 if subnets.listed_shaped else bpf.F_LISTED_UNSHAPED)
        # (with subnets, HTB's default class, which only non-IP packets take, stays as ADD made it)
        lifted = [i for _w, i, _b in DIRECTIONS if old.now[i][0] and not new.now[i][0]]
        if bpf.EGRESS in lifted:
            flags &= ~bpf.F_EGRESS_SHAPED
            ifb_index = 0
            _steer_egress(nl, progs, t, policy, None, undo)
        if bpf.INGRESS in lifted:
            flags &= ~bpf.F_INGRESS_SHAPED
        bpf.attach_update(progs.map_fd, t.attach_id, flags=flags, ifb_index=ifb_index)
    except BaseException:
        undo.rollback()
        raise
    # nothing steers into these any more
    if bpf.INGRESS in lifted:
        tc.delete_qdisc(nl, host.index, tc.TC_H_ROOT, tc.ROOT_HANDLE)
    if bpf.EGRESS in lifted and ifb is not None:
        nl.delete_link(ifb.index)
    log(
        f"attachment {t.attach_id}: ingress {_fmt(new.now[0])}, egress {_fmt(new.now[1])} (was "
        f"{_fmt(old.now[0])}, {_fmt(old.now[1])})"
    )


def _fmt(pair: tuple[int, int]) -> str:
    return f"{pair[0]} bit/s burst {pair[1]} bit" if pair[0] else "unshaped"


def _claim_root(nl: Netlink, index: int, veth: str) -> None:
    root = tc.root_qdisc(nl, index)
    if root is not None and root.kind != "noqueue":
        raise ForeignObjectError(
            f"host veth {veth} has a root qdisc {root.kind} that bwplugin did not create: "
            "it cannot shape traffic to the pod there"
        )


def _change_root(
    nl: Netlink,
    index: int,
    before: Direction,
    after: Direction,
    policy: Policy,
    split: Subnets | None,
    host: HostVeth,
    undo: Undo,
) -> None:
    """In place: the qdisc keeps its queue, so no packet is dropped by the change."""
    q = tc.root_qdisc(nl, index)
    if not tc.is_our_root(q):
        raise ForeignObjectError(f"ifindex {index} no longer has bwplugin's root qdisc: run CHECK, or recreate the pod")
    assert q is not None

    old = tbf_params(before, policy, host.mtu, host.gso_max)
    new = tbf_params(after, policy, host.mtu, host.gso_max)
    at = tc.ROOT_TBF
    if q.kind == "htb":
        leaf = tc.shaped_leaf(nl, index)
        if leaf is not None and leaf.kind == "bfifo":  # a legacy build's HTB: nothing can get stuck
            tc.change_legacy_htb(nl, index, new, host.mtu)
            undo.push(lambda: tc.change_legacy_htb(nl, index, old, host.mtu))
            return
        at = tc.LEAF_TBF  # today's: its shaped class's TBF leaf, changed as a root TBF is
    undo.push(lambda: tc.change_tbf(nl, index, old, at))
    change_tbf_safely(nl, index, old, new, at)


SHRINK_WAIT = 1.0  # s the queued packets bigger than a new, smaller bucket get to leave
LIMIT_STEP_S, LIMIT_WAIT = 0.05, 3.0  # a smaller queue limit: see change_tbf_safely


def change_tbf_safely(nl: Netlink, index: int, old: TBFParams, new: TBFParams, at: tc.TbfAt = tc.ROOT_TBF) -> None:
    """A change that lowers the rate, the bucket or the queue, under traffic, with
    no stall and as few losses as the queue allows (a tail-drop FIFO; this kernel
    has no AQM to soften it): a burst of tail drops is what costs TCP a
    retransmission timeout, as its own retransmissions drown in it. Measured in 20
    cuts 20 -> 10 Mbit/s: 4-5 timed out (12 with the earlier ramp); with the old
    queue limit kept, none, so what remains comes from step 3, which the latency
    bound needs.

    1. The rate and the bucket change at once, with the larger queue limit (in
       bytes): TCP is clocked by its ACKs, so it only queues longer, and loses
       nothing.
    2. TBF never sends a packet bigger than its bucket, and the packets queued
       then were let in (segmented) to fit the old one. From this change on,
       arrivals are segmented to fit the new bucket; whenever one of the
       older packets blocks the head, the old bucket is lent just until it has
       left (a change refills the bucket at once), then taken back. Dropping the
       queue is the last resort, after SHRINK_WAIT.
    3. Then the queue limit follows the backlog down: every 50 ms it becomes the
       largest backlog of the last 50 ms, so that the limit itself drops nothing
       and TCP's own losses at it (which it repairs by fast retransmit, and backs
       off from) bring the queue down, until the limit is the new one (at most 3 s,
       then it is set)."""
    if new.burst >= old.burst and new.limit >= old.limit:
        tc.change_tbf(nl, index, new, at)
        return
    big = max(old.limit, new.limit)
    shrunk = replace(new, limit=big)  # the new rate and bucket, the larger queue
    tc.change_tbf(nl, index, shrunk, at)
    if new.burst < old.burst and not _oversized_leave(nl, index, replace(shrunk, burst=old.burst), shrunk, at):
        log(f"ifindex {index}: for {SHRINK_WAIT:g} s the queue held packets bigger than the new bucket; dropping them")
        tc.purge_tbf_queue(nl, index, big, at)
        tc.change_tbf(nl, index, shrunk, at)
    limit, deadline = big, time.monotonic() + LIMIT_WAIT
    while limit > new.limit and time.monotonic() < deadline:
        peak = _peak_backlog(nl, index, LIMIT_STEP_S, at)
        limit = max(new.limit, min(limit, peak))
        tc.change_tbf(nl, index, replace(new, limit=limit), at)
    tc.change_tbf(nl, index, new, at)


def _oversized_leave(nl: Netlink, index: int, lend: TBFParams, new: TBFParams, at: tc.TbfAt) -> bool:
    """With the new bucket in place: True once every packet queued at that moment
    has left (the fifo has sent as many bytes as it held then). A head that sends
    nothing for longer than a fitting packet can wait for its tokens is one of the
    old, bigger packets: the old bucket is lent until it has gone. What arrived
    while it was lent may be as big, so the count starts again from there."""
    patience = max(0.003, 1.5 * new.burst / new.rate)  # a packet that fits waits at most one refill
    deadline = time.monotonic() + SHRINK_WAIT
    held, sent_then = _backlog(nl, index, at)
    last, moved = sent_then, time.monotonic()
    while time.monotonic() < deadline:
        backlog, sent = _backlog(nl, index, at)
        if backlog == 0 or sent - sent_then >= held:
            return True
        now = time.monotonic()
        if sent != last:
            last, moved = sent, now
        elif now - moved > patience:
            tc.change_tbf(nl, index, lend, at)
            lent = time.monotonic()
            while _backlog(nl, index, at)[1] == sent and time.monotonic() - lent < 0.05:
                time.sleep(0.0002)
            tc.change_tbf(nl, index, new, at)
            held, sent_then = _backlog(nl, index, at)
            last, moved = sent_then, time.monotonic()
        time.sleep(0.0005)
    return False


def _peak_backlog(nl: Netlink, index: int, seconds: float, at: tc.TbfAt) -> int:
    """The largest backlog seen over `seconds` (a queue under TCP swings by half
    its size within milliseconds: one reading would cut below what it needs)."""
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, _backlog(nl, index, at)[0])
        time.sleep(0.001)
    return peak


def _backlog(nl: Netlink, index: int, at: tc.TbfAt) -> tuple[int, int]:
    """(bytes queued, bytes sent) of our TBF (not of the HTB over it, whose counts
    include the unshaped class's)."""
    q = tc.tbf_at(nl, index, at)
    s = tc.qdisc_stats(q) if q is not None else None
    return (s.backlog, s.bytes) if s else (0, 0)


def _steer_egress(
    nl: Netlink, progs: bpf.Programs, t: Target, policy: Policy, ifb_index: int | None, undo: Undo
) -> None:
    """With act_mirred (kernels before 6.4), the from-pod filter itself names the
    ifb: it is swapped atomically for one that does (or, lifting, one that does not)."""
    mode = probe.redirect_mode(progs, policy.egress_redirect) if ifb_index else "bpf"
    current = tc.our_filters(nl, t.host.index).get((tc.CLSACT_INGRESS, tc.TAIL_PRIO))
    was_mirred = current is not None and current.mirred_ifindex is not None
    if mode != "mirred" and not was_mirred:
        return  # bpf_redirect: the map write alone steers
    prog = "bwp_from_pod_mirred" if mode == "mirred" else "bwp_from_pod"
    target = ifb_index if mode == "mirred" else None

    def swap(name: str, to: int | None) -> None:
        fd, flt = progs.fd(name), progs.filter_name(name)
        tc.add_bpf_filter(nl, t.host.index, tc.CLSACT_INGRESS, fd, flt, t.attach_id, to, True, tc.TAIL_PRIO)

    swap(prog, target)
    if current is not None:
        old_name = "bwp_from_pod_mirred" if was_mirred else "bwp_from_pod"
        undo.push(lambda: swap(old_name, current.mirred_ifindex))


def _replace_subnets(progs: bpf.Programs, attach_id: int, subnets: Subnets) -> None:
    """New prefixes first, then the old ones go: a peer in both lists never falls
    between them."""
    old = set(bpf.subnets_of(progs.lpm_fd, attach_id))
    bpf.subnets_add(progs.lpm_fd, attach_id, tuple(n for n in subnets.networks if n not in old))
    for net in old - set(subnets.networks):
        bpf.map_delete(progs.lpm_fd, bpf.lpm_key(attach_id, net))


def describe(
    nl: Netlink, progs: bpf.Programs, t: Target, rec: bpf.ShapingEntry, changed: bool, origin: str
) -> dict[str, Any]:
    def direction(i: int, bit: int) -> dict[str, Any]:
        rate, burst = rec.now[i]
        return {"rate": rate, "burst": burst, "source": "override" if rec.flags & bit else "runtime"}

    ifb = nl.link(name=ifb_name_of_owner(t.entry.owner))
    return {
        "attachment": {
            "id": t.attach_id,
            "namespace": t.pod.namespace,
            "pod": t.pod.name,
            "container_id": t.entry.container_id,
            "ifname": t.entry.ifname,
            "host_veth": t.host.name,
            "ifb": ifb.name if ifb else "",
        },
        "ingress": direction(bpf.INGRESS, bpf.S_INGRESS_OVERRIDE),
        "egress": direction(bpf.EGRESS, bpf.S_EGRESS_OVERRIDE),
        "subnets": [str(n) for n in bpf.subnets_of(progs.lpm_fd, t.attach_id)],
        "changes": rec.changes,
        "changed": changed,
        "origin": origin,
    }
