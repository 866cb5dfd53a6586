"""The tc objects bwplugin owns: TBF or HTB roots, the clsact qdisc and its cls_bpf filters.

Handles and priorities are fixed and distinctive so that we can tell our
objects from anybody else's and never touch theirs. A clsact may be shared with
other tools: we add and remove only our own filters on it."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from ..cni.errors import KernelFeatureError
from .netlink import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
    RTM_NEWTFILTER,
    Netlink,
    NetlinkError,
    TcObject,
    attr_str,
    attr_u32,
    attr_u64,
    nla,
    nla_nested,
    nla_str,
    nla_u32,
    nla_u64,
    parse_attrs,
    tcmsg,
)
from .shaping import TBFParams, htb_leaf_limit

TC_H_ROOT = 0xFFFFFFFF
TC_H_CLSACT = 0xFFFFFFF1  # also TC_H_INGRESS: the parent of clsact/ingress qdiscs
CLSACT_HANDLE = 0xFFFF0000
CLSACT_INGRESS = 0xFFFFFFF2  # ffff:fff2, the clsact hook for packets the device receives
CLSACT_EGRESS = 0xFFFFFFF3  # ffff:fff3, the hook for packets it sends
ROOT_HANDLE = 0xB0D00000  # "b0d0:", bwplugin's root TBF or HTB on veth and ifb
TBF_HANDLE = ROOT_HANDLE
CLASS_SHAPED = ROOT_HANDLE | 1  # b0d0:1 (bpf/bwplugin.c puts these in skb->priority)
CLASS_UNSHAPED = ROOT_HANDLE | 2  # b0d0:2
LEAF_HANDLE = {CLASS_SHAPED: 0xB0D10000, CLASS_UNSHAPED: 0xB0D20000}  # the classes' qdiscs
PURGE_HANDLE = 0xB0D90000  # a TBF's inner fifo after a purge (see purge_tbf_queue)
NLM_F_REPLACE = 0x100
# Counting and classifying come first on a hook, so that no other tool's filter
# can hide a packet from them; the redirect to the ifb comes last, so that other
# tools' filters still see what the pod sends. Filters at other priorities are
# somebody else's. (Builds before sharing put both hooks' filters at FRONT_PRIO.)
FRONT_PRIO = 0xB0D
TAIL_PRIO = 0xFB0D
OUR_PRIOS = (FRONT_PRIO, TAIL_PRIO)
FILTER_HANDLE = 1
ETH_P_ALL_BE = 0x0300  # htons(ETH_P_ALL)
UNSHAPED_RATE = 125_000_000_000  # bytes/s (1 Tbit/s): HTB needs a rate; this one never binds
CLASSIFY_RATE = UNSHAPED_RATE  # the shaped class's too: its TBF leaf shapes, HTB only sorts
UNSHAPED_LIMIT = 4 << 20  # bytes: the unshaped class only queues while the device is busy

TCA_KIND, TCA_OPTIONS = 1, 2
TCA_TBF_PARMS, TCA_TBF_RATE64, TCA_TBF_BURST = 1, 4, 6
TCA_HTB_PARMS, TCA_HTB_INIT, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 2, 6, 7
TCA_BPF_ACT, TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 1, 3, 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TCA_ACT_KIND, TCA_ACT_OPTIONS = 1, 2
TCA_MIRRED_PARMS = 2
TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_PIPE, TC_ACT_STOLEN = -1, 0, 3, 4
TCA_EGRESS_REDIR, TCA_EGRESS_MIRROR, TCA_INGRESS_REDIR, TCA_INGRESS_MIRROR = 1, 2, 3, 4
TCA_GACT_PARMS = 2
TCA_U32_SEL = 5
# where each classifier keeps its actions (TCA_<KIND>_ACT)
ACTIONS_ATTR = {"u32": 7, "bpf": TCA_BPF_ACT, "matchall": 2, "flower": 3, "basic": 3, "fw": 4, "route": 6}
TCA_STATS_BASIC, TCA_STATS_QUEUE = 1, 3
TC_LINKLAYER_ETHERNET = 1

_RATESPEC = "BBHhHI"
_TBF_QOPT = struct.Struct("=" + _RATESPEC + _RATESPEC + "III")
_HTB_OPT = struct.Struct("=" + _RATESPEC + _RATESPEC + "IIIII")  # rate, ceil, buffer, cbuffer, quantum, level, prio
_HTB_GLOB = struct.Struct("=IIIII")  # version, rate2quantum, defcls, debug, direct_pkts
_MIRRED = struct.Struct("=IIiiiiI")  # tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex

# qdisc/filter/action kinds bwplugin needs, and the module that provides each
KINDS = {"tbf": "sch_tbf", "htb": "sch_htb", "bfifo": "sch_fifo", "clsact": "sch_ingress", "bpf": "cls_bpf"}


def module_of(kind: str) -> str:
    """The kernel module that provides a kind (ours are listed; others are qdiscs)."""
    return KINDS.get(kind, f"sch_{kind}")


@dataclass(frozen=True)
class TBFState:
    """A TBF as the kernel reports it."""

    handle: int
    rate: int  # bytes/s
    limit: int  # bytes
    buffer_ticks: int


@dataclass(frozen=True)
class TbfAt:
    """Where one of our TBFs hangs: the root (plain mode) or the leaf of HTB's
    shaped class (subnet mode)."""

    handle: int
    parent: int


ROOT_TBF = TbfAt(TBF_HANDLE, TC_H_ROOT)
LEAF_TBF = TbfAt(LEAF_HANDLE[CLASS_SHAPED], CLASS_SHAPED)


@dataclass(frozen=True)
class HTBClass:
    classid: int
    rate: int  # bytes/s
    ceil: int
    buffer_ticks: int
    quantum: int


@dataclass(frozen=True)
class QdiscStats:
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog: int
    qlen: int


@dataclass(frozen=True)
class HookFilter:
    """Any filter on a clsact hook, in the order the kernel runs them."""

    kind: str
    prio: int
    handle: int
    ours: bool
    verdict: str  # "continue": provably passes every packet on; "ends": provably not; "unknown"
    detail: str  # for messages: what it does with a packet, as far as we can tell

    def describe(self) -> str:
        return f"{self.kind} filter prio {self.prio} handle {self.handle:#x} ({self.detail})"


@dataclass(frozen=True)
class BPFFilter:
    hook: int  # CLSACT_INGRESS or CLSACT_EGRESS
    prio: int
    handle: int
    name: str
    prog_id: int
    classid: int  # bwplugin's attachment id
    direct_action: bool
    mirred_ifindex: int | None  # the redirect target of a mirred action, if any


def _create(nl: Netlink, msg_type: int, body: bytes, kind: str, what: str, flags: int = NLM_F_EXCL) -> None:
    """A create that turns "the kernel has no such kind" into a clear error."""
    try:
        nl.request(msg_type, NLM_F_CREATE | flags, body, what)
    except NetlinkError as exc:
        if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP) and "unknown" in exc.ext_msg.lower():
            module = module_of(kind)
            raise KernelFeatureError(
                f"the kernel has no {kind!r} tc kind ({module} is neither built in nor loadable): {what} failed",
                exc.ext_msg,
            ) from exc
        raise


def _ratespec(rate: int) -> tuple[int, int, int, int, int, int]:
    return (0, TC_LINKLAYER_ETHERNET, 0, 0, 0, min(rate, 0xFFFFFFFF))


def _tbf_options(params: TBFParams) -> bytes:
    qopt = _TBF_QOPT.pack(*_ratespec(params.rate), *_ratespec(0), params.limit, params.buffer_ticks, 0)
    opts = nla(TCA_TBF_PARMS, qopt) + nla_u32(TCA_TBF_BURST, params.burst)
    if params.rate > 0xFFFFFFFF:
        opts += nla_u64(TCA_TBF_RATE64, params.rate)
    return nla_str(TCA_KIND, "tbf") + nla(TCA_OPTIONS, opts)


def add_tbf(nl: Netlink, index: int, params: TBFParams, at: TbfAt = ROOT_TBF) -> None:
    """One of our TBFs (exclusive create: never replaces somebody else's root)."""
    body = tcmsg(index, at.handle, at.parent) + _tbf_options(params)
    _create(nl, RTM_NEWQDISC, body, "tbf", f"add tbf {at.handle >> 16:x}: on ifindex {index}")


def change_tbf(nl: Netlink, index: int, params: TBFParams, at: TbfAt = ROOT_TBF) -> None:
    """Our TBF's rate, bucket and queue changed in place (no create flag: the
    kernel refuses if it is gone). The queued packets stay; only the bucket refills."""
    body = tcmsg(index, at.handle, at.parent) + _tbf_options(params)
    nl.request(RTM_NEWQDISC, 0, body, f"change tbf {at.handle >> 16:x}: on ifindex {index}")


def purge_tbf_queue(nl: Netlink, index: int, limit: int, at: TbfAt = ROOT_TBF) -> None:
    """Replace our TBF's inner fifo with an empty one (the queued packets are
    dropped): the last resort when a queued packet can never fit the bucket."""
    body = tcmsg(index, PURGE_HANDLE, at.handle | 1) + nla_str(TCA_KIND, "bfifo")
    body += nla(TCA_OPTIONS, struct.pack("=I", limit))
    nl.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, body, f"purge tbf queue on ifindex {index}")


def add_root_qdisc(nl: Netlink, index: int, kind: str) -> None:
    """A root qdisc of any kind with its default options (used to probe kinds)."""
    body = tcmsg(index, ROOT_HANDLE, TC_H_ROOT) + nla_str(TCA_KIND, kind)
    _create(nl, RTM_NEWQDISC, body, kind, f"add {kind} on ifindex {index}")


def htb_quantum(rate: int, mtu: int) -> int:
    """Given explicitly, so the kernel never warns about r2q ("quantum of class is
    big/small"); HTB's own rate/10 rule, clamped to [one frame, 200000]."""
    return max(mtu + 14, min(rate // 10, 200_000))


def add_htb(nl: Netlink, index: int, params: TBFParams, default_shaped: bool, mtu: int) -> None:
    """A root HTB that only sorts: two classes that never bind, the shaped one
    with a TBF leaf built as plain mode's root TBF (the rate, the bucket, the
    latency bound, and the segmenting of GSO packets bigger than the bucket, which
    HTB itself never does), the unshaped one with a bfifo. The eBPF programs
    choose the class through skb->priority; unclassified packets take the
    default class. (The kernel logs "htb: tbf qdisc b0d1: is non-work-conserving?"
    once per such leaf, the first time it waits for tokens: that is TBF's nature.)"""
    default = CLASS_SHAPED if default_shaped else CLASS_UNSHAPED
    glob = _HTB_GLOB.pack(3, 10, default & 0xFFFF, 0, 0)
    body = tcmsg(index, ROOT_HANDLE, TC_H_ROOT) + nla_str(TCA_KIND, "htb") + nla(TCA_OPTIONS, nla(TCA_HTB_INIT, glob))
    _create(nl, RTM_NEWQDISC, body, "htb", f"add htb on ifindex {index}")
    for classid in (CLASS_SHAPED, CLASS_UNSHAPED):
        _htb_class(nl, index, classid, CLASSIFY_RATE, classify_ticks(mtu), mtu, create=True)
    add_tbf(nl, index, params, LEAF_TBF)
    # an explicit byte fifo: the default leaf is a pfifo of txqueuelen packets
    # (32 on an ifb), which is neither a latency bound nor a byte bound
    _bfifo(nl, index, CLASS_UNSHAPED, UNSHAPED_LIMIT, create=True)


def classify_ticks(mtu: int) -> int:
    """The never-binding classes' bucket: one GSO packet at 1 Tbit/s."""
    return (64 * 1024 + mtu + 14) * 10**9 // CLASSIFY_RATE // 64 + 1


def change_legacy_htb(nl: Netlink, index: int, params: TBFParams, mtu: int) -> None:
    """An HTB made before 2026-12-03, whose shaped class itself holds the rate over
    a bfifo leaf: changed in place, queues kept (HTB lets a packet overdraw its
    bucket, so nothing can get stuck)."""
    _htb_class(nl, index, CLASS_SHAPED, params.rate, params.htb_buffer_ticks, mtu, create=False)
    _bfifo(nl, index, CLASS_SHAPED, htb_leaf_limit(params, mtu), create=False)


def _htb_class(nl: Netlink, index: int, classid: int, rate: int, ticks: int, mtu: int, create: bool) -> None:
    opt = _HTB_OPT.pack(*_ratespec(rate), *_ratespec(rate), ticks, ticks, htb_quantum(rate, mtu), 0, 0)
    opts = nla(TCA_HTB_PARMS, opt)
    if rate > 0xFFFFFFFF:
        opts += nla_u64(TCA_HTB_RATE64, rate) + nla_u64(TCA_HTB_CEIL64, rate)
    body = tcmsg(index, classid, ROOT_HANDLE) + nla_str(TCA_KIND, "htb") + nla(TCA_OPTIONS, opts)
    what = f"{'add' if create else 'change'} htb class {classid >> 16:x}:{classid & 0xFFFF:x} on {index}"
    if create:
        _create(nl, RTM_NEWTCLASS, body, "htb", what)
    else:
        nl.request(RTM_NEWTCLASS, 0, body, what)


def _bfifo(nl: Netlink, index: int, classid: int, limit: int, create: bool) -> None:
    body = tcmsg(index, LEAF_HANDLE[classid], classid) + nla_str(TCA_KIND, "bfifo")
    body += nla(TCA_OPTIONS, struct.pack("=I", limit))
    what = f"{'add' if create else 'change'} bfifo under class {classid & 0xFFFF:x} on {index}"
    if create:
        _create(nl, RTM_NEWQDISC, body, "bfifo", what)
    else:
        nl.request(RTM_NEWQDISC, 0, body, what)


def add_clsact(nl: Netlink, index: int) -> None:
    body = tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT) + nla_str(TCA_KIND, "clsact")
    _create(nl, RTM_NEWQDISC, body, "clsact", f"add clsact on ifindex {index}")


def add_bpf_filter(
    nl: Netlink,
    index: int,
    hook: int,
    prog_fd: int,
    name: str,
    classid: int,
    mirred_to: int | None = None,
    replace: bool = False,
    prio: int = FRONT_PRIO,
) -> None:
    """cls_bpf on a clsact hook, in direct-action mode, or (mirred_to) as a plain
    classifier whose match runs an act_mirred redirect to that ifindex. cls_bpf
    hands the classid to the program in skb->tc_classid: it is the attachment id.
    replace: swap our existing filter for this one atomically (a live change)."""
    opts = nla_u32(TCA_BPF_CLASSID, classid) + nla_u32(TCA_BPF_FD, prog_fd) + nla_str(TCA_BPF_NAME, name)
    if mirred_to is None:
        opts += nla_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
    else:
        parms = _MIRRED.pack(0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, mirred_to)
        action = nla_str(TCA_ACT_KIND, "mirred") + nla_nested(TCA_ACT_OPTIONS, nla(TCA_MIRRED_PARMS, parms))
        opts += nla_nested(TCA_BPF_ACT, nla_nested(1, action))
    info = (prio << 16) | ETH_P_ALL_BE
    body = tcmsg(index, FILTER_HANDLE, hook, info) + nla_str(TCA_KIND, "bpf") + nla(TCA_OPTIONS, opts)
    what = f"{'replace' if replace else 'add'} bpf filter on ifindex {index}"
    _create(nl, RTM_NEWTFILTER, body, "bpf", what, flags=0 if replace else NLM_F_EXCL)


def delete_filter(nl: Netlink, index: int, hook: int, prio: int, handle: int = FILTER_HANDLE) -> bool:
    """Delete one of our cls_bpf filters; False if it (or the device) was gone."""
    body = tcmsg(index, handle, hook, (prio << 16) | ETH_P_ALL_BE) + nla_str(TCA_KIND, "bpf")
    try:
        nl.request(RTM_DELTFILTER, 0, body, f"delete filter prio {prio} on ifindex {index}")
    except NetlinkError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise
    return True


def delete_our_filter(nl: Netlink, index: int, hook: int, prio: int, classid: int) -> bool:
    """Delete our filter at (hook, prio) only if it is there and carries this
    attachment id: a filter another tool put in that slot is never touched."""
    f = our_filters(nl, index).get((hook, prio))
    return f is not None and f.classid == classid and delete_filter(nl, index, hook, prio, f.handle)


def clsact_is_empty(nl: Netlink, index: int) -> bool:
    return not nl.filters(index, CLSACT_INGRESS) and not nl.filters(index, CLSACT_EGRESS)


def delete_qdisc(nl: Netlink, index: int, parent: int, handle: int) -> bool:
    """Delete one qdisc; False if it (or the device) was already gone."""
    try:
        nl.request(RTM_DELQDISC, 0, tcmsg(index, handle, parent), f"delete qdisc on ifindex {index}")
    except NetlinkError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise
    return True


def root_qdisc(nl: Netlink, index: int) -> TcObject | None:
    return nl.qdisc(index, TC_H_ROOT)


def tbf_at(nl: Netlink, index: int, at: TbfAt) -> TcObject | None:
    """Our TBF at that place, or None (another kind, another handle, nothing)."""
    q = nl.qdisc(index, at.parent)
    return q if q is not None and q.kind == "tbf" and q.handle == at.handle else None


def shaped_leaf(nl: Netlink, index: int) -> TcObject | None:
    """The qdisc under our HTB's shaped class: a TBF, or a legacy build's bfifo."""
    return nl.qdisc(index, CLASS_SHAPED)


def clsact_qdisc(nl: Netlink, index: int) -> TcObject | None:
    """The clsact (or plain ingress) qdisc: both hang at ffff:fff1."""
    return nl.qdisc(index, TC_H_CLSACT)


def is_our_root(q: TcObject | None) -> bool:
    return q is not None and q.kind in ("tbf", "htb") and q.handle == ROOT_HANDLE


def tbf_state(q: TcObject) -> TBFState | None:
    raw = q.options.get(TCA_TBF_PARMS)
    if q.kind != "tbf" or raw is None or len(raw) < _TBF_QOPT.size:
        return None
    fields = _TBF_QOPT.unpack_from(raw)
    rate = attr_u64(q.options, TCA_TBF_RATE64) or fields[5]
    return TBFState(handle=q.handle, rate=rate, limit=fields[12], buffer_ticks=fields[13])


def bfifo_limit(q: TcObject) -> int | None:
    raw = q.raw_options
    return int(struct.unpack_from("=I", raw)[0]) if q.kind == "bfifo" and len(raw) >= 4 else None


def htb_classes(nl: Netlink, index: int) -> dict[int, HTBClass]:
    out = {}
    for c in nl.classes(index):
        raw = c.options.get(TCA_HTB_PARMS)
        if c.kind != "htb" or raw is None or len(raw) < _HTB_OPT.size:
            continue
        f = _HTB_OPT.unpack_from(raw)
        rate = attr_u64(c.options, TCA_HTB_RATE64) or f[5]
        ceil = attr_u64(c.options, TCA_HTB_CEIL64) or f[11]
        out[c.handle] = HTBClass(c.handle, rate, ceil, f[12], f[14])
    return out


def qdisc_stats(q: TcObject) -> QdiscStats:
    basic = q.stats2.get(TCA_STATS_BASIC, b"")
    queue = q.stats2.get(TCA_STATS_QUEUE, b"")
    nbytes, packets = struct.unpack_from("=QI", basic) if len(basic) >= 12 else (0, 0)
    qlen, backlog, drops, _requeues, overlimits = (
        struct.unpack_from("=IIIII", queue) if len(queue) >= 20 else (0, 0, 0, 0, 0)
    )
    return QdiscStats(nbytes, packets, drops, overlimits, backlog, qlen)


def our_filters(nl: Netlink, index: int) -> dict[tuple[int, int], BPFFilter]:
    """bwplugin's filters on a veth's clsact hooks (ours: our priorities and
    name), keyed by (hook, prio)."""
    return scan_hooks(nl, index)[0]


def scan_hooks(nl: Netlink, index: int) -> tuple[dict[tuple[int, int], BPFFilter], int]:
    """Our filters on both clsact hooks, and how many filters are not ours."""
    ours, foreign = {}, 0
    for hook in (CLSACT_INGRESS, CLSACT_EGRESS):
        for f in nl.filters(index, hook):
            if f.handle == 0:
                continue  # a priority's chain head, not a filter
            if _is_ours(f):
                bf = _bpf_filter(hook, f)
                ours[(hook, bf.prio)] = bf
            else:
                foreign += 1
    return ours, foreign


def our_classid(nl: Netlink, index: int) -> int | None:
    """The attachment id our filters on a veth carry."""
    filters = our_filters(nl, index)
    return next((f.classid for f in filters.values()), None)


def hook_filters(nl: Netlink, index: int, hook: int) -> list[HookFilter]:
    """Every filter on a hook, in the order the kernel runs them (the dump lists
    them by priority, then as each chain holds them). The kernel lists a u32
    filter under both hooks when both have u32 filters of that priority (they
    share hash tables): CHECK then judges it on both, erring toward a report."""
    out = []
    for f in nl.filters(index, hook):
        if f.handle == 0 or (f.kind == "u32" and TCA_U32_SEL not in f.options):
            continue  # a priority's chain head, or a u32 hash table: not a filter
        verdict, detail = _verdict(f)
        out.append(HookFilter(f.kind, f.info >> 16, f.handle, _is_ours(f), verdict, detail))
    return out


def _is_ours(f: TcObject) -> bool:
    """bwplugin's: a cls_bpf filter at one of our priorities, named by us."""
    name = attr_str(f.options, TCA_BPF_NAME) or ""
    return f.kind == "bpf" and f.info >> 16 in OUR_PRIOS and name.startswith("bwplugin:")


def _verdict(f: TcObject) -> tuple[str, str]:
    """What a filter does with a packet it matches, as far as its attributes
    tell: only a chain of actions ending in gact `continue` (mirrors allowed)
    provably passes packets on to the next filter."""
    if f.kind == "bpf" and (attr_u32(f.options, TCA_BPF_FLAGS) or 0) & TCA_BPF_FLAG_ACT_DIRECT:
        name = attr_str(f.options, TCA_BPF_NAME) or "?"
        return "unknown", f"eBPF program {name} in direct-action mode: its verdict is its own"
    attr = ACTIONS_ATTR.get(f.kind)
    if attr is None:
        return "unknown", "a classifier whose actions bwplugin does not read"
    actions = [parse_attrs(a) for a in parse_attrs(f.options.get(attr, b"")).values()]
    if not actions:
        return "ends", "no actions: a match ends classification"
    for action in actions:
        kind = attr_str(action, TCA_ACT_KIND) or "?"
        parms = parse_attrs(action.get(TCA_ACT_OPTIONS, b""))
        if kind == "mirred":
            raw = parms.get(TCA_MIRRED_PARMS, b"")
            if len(raw) < _MIRRED.size:
                return "unknown", "action mirred"
            fields = _MIRRED.unpack_from(raw)
            eaction, verdict = fields[5], fields[2]
            if eaction not in (TCA_EGRESS_MIRROR, TCA_INGRESS_MIRROR):
                return "ends", "action mirred redirect: takes the packet"
        elif kind == "gact":
            raw = parms.get(TCA_GACT_PARMS, b"")
            if len(raw) < 12:
                return "unknown", "action gact"
            verdict = struct.unpack_from("=IIi", raw)[2]
        else:
            return "unknown", f"action {kind}"
        if verdict == TC_ACT_PIPE:
            continue
        if verdict == TC_ACT_UNSPEC:
            return "continue", "action continue"
        return "ends", f"action with verdict {_VERDICTS.get(verdict, verdict)}"
    return "ends", "actions end in pipe: classification stops there"


_VERDICTS = {TC_ACT_OK: "ok", 1: "reclassify", 2: "drop", TC_ACT_PIPE: "pipe", TC_ACT_STOLEN: "stolen", 7: "redirect"}


def _mirred_target(raw: bytes | None) -> int | None:
    for action in parse_attrs(raw or b"").values():
        attrs = parse_attrs(action)
        if attr_str(attrs, TCA_ACT_KIND) != "mirred":
            continue
        parms = parse_attrs(attrs.get(TCA_ACT_OPTIONS, b"")).get(TCA_MIRRED_PARMS)
        if parms is not None and len(parms) >= _MIRRED.size:
            return int(_MIRRED.unpack_from(parms)[6])
    return None


def bpf_filters(nl: Netlink, index: int, hook: int) -> list[BPFFilter]:
    return [_bpf_filter(hook, f) for f in nl.filters(index, hook) if f.kind == "bpf" and f.handle != 0]


def _bpf_filter(hook: int, f: TcObject) -> BPFFilter:
    return BPFFilter(
        hook=hook,
        prio=f.info >> 16,
        handle=f.handle,
        name=attr_str(f.options, TCA_BPF_NAME) or "",
        prog_id=attr_u32(f.options, TCA_BPF_ID) or 0,
        classid=attr_u32(f.options, TCA_BPF_CLASSID) or 0,
        direct_action=bool((attr_u32(f.options, TCA_BPF_FLAGS) or 0) & TCA_BPF_FLAG_ACT_DIRECT),
        mirred_ifindex=_mirred_target(f.options.get(TCA_BPF_ACT)),
    )
