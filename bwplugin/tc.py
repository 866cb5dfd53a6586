"""The tc objects bwplugin owns: TBF roots, the clsact qdisc and its cls_bpf filter.

Handles and priorities are fixed and distinctive so that we can tell our
objects from anybody else's and never touch theirs."""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from .netlink import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    RTM_DELQDISC,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
    Netlink,
    NetlinkError,
    TcObject,
    attr_str,
    attr_u32,
    attr_u64,
    nla,
    nla_str,
    nla_u32,
    nla_u64,
    tcmsg,
)
from .shaping import TBFParams

TC_H_ROOT = 0xFFFFFFFF
TC_H_CLSACT = 0xFFFFFFF1  # also TC_H_INGRESS: the parent of clsact/ingress qdiscs
CLSACT_HANDLE = 0xFFFF0000
CLSACT_INGRESS = 0xFFFFFFF2  # ffff:fff2, the ingress hook of clsact
TBF_HANDLE = 0xB0D00000  # "b0d0:", bwplugin's TBF on veth and ifb
FILTER_PRIO = 0xB0D
FILTER_HANDLE = 1
ETH_P_ALL_BE = 0x0300  # htons(ETH_P_ALL)

TCA_TBF_PARMS, TCA_TBF_RATE64, TCA_TBF_BURST = 1, 4, 6
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS, TCA_BPF_ID = 3, 6, 7, 8, 11
TCA_BPF_FLAG_ACT_DIRECT = 1
TCA_STATS_BASIC, TCA_STATS_QUEUE = 1, 3
TC_LINKLAYER_ETHERNET = 1

_RATESPEC = "BBHhHI"
_TBF_QOPT = struct.Struct("=" + _RATESPEC + _RATESPEC + "III")


@dataclass(frozen=True)
class TBFState:
    """A TBF as the kernel reports it."""

    handle: int
    rate: int  # bytes/s
    limit: int  # bytes
    buffer_ticks: int


@dataclass(frozen=True)
class QdiscStats:
    bytes: int
    packets: int
    drops: int
    overlimits: int
    backlog: int
    qlen: int


@dataclass(frozen=True)
class BPFFilter:
    prio: int
    handle: int
    name: str
    prog_id: int
    classid: int  # bwplugin's attachment id
    direct_action: bool


def add_tbf(nl: Netlink, index: int, params: TBFParams) -> None:
    """A root TBF (exclusive create: never replaces somebody else's root)."""
    qopt = _TBF_QOPT.pack(
        0, TC_LINKLAYER_ETHERNET, 0, 0, 0, min(params.rate, 0xFFFFFFFF),
        0, 0, 0, 0, 0, 0,
        params.limit, params.buffer_ticks, 0,
    )  # fmt: skip
    opts = nla(TCA_TBF_PARMS, qopt) + nla_u32(TCA_TBF_BURST, params.burst)
    if params.rate > 0xFFFFFFFF:
        opts += nla_u64(TCA_TBF_RATE64, params.rate)
    body = tcmsg(index, TBF_HANDLE, TC_H_ROOT) + nla_str(1, "tbf") + nla(2, opts)
    nl.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body, f"add tbf on ifindex {index}")


def add_clsact(nl: Netlink, index: int) -> None:
    body = tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT) + nla_str(1, "clsact")
    nl.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, body, f"add clsact on ifindex {index}")


def add_bpf_filter(nl: Netlink, index: int, prog_fd: int, name: str, classid: int) -> None:
    """cls_bpf in direct-action mode on the clsact ingress hook. cls_bpf hands the
    classid to the program in skb->tc_classid: it is the attachment id."""
    opts = nla_u32(TCA_BPF_CLASSID, classid) + nla_u32(TCA_BPF_FD, prog_fd) + nla_str(TCA_BPF_NAME, name)
    opts += nla_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
    info = (FILTER_PRIO << 16) | ETH_P_ALL_BE
    body = tcmsg(index, FILTER_HANDLE, CLSACT_INGRESS, info) + nla_str(1, "bpf") + nla(2, opts)
    nl.request(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, body, f"add bpf filter on ifindex {index}")


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


def clsact_qdisc(nl: Netlink, index: int) -> TcObject | None:
    """The clsact (or plain ingress) qdisc: both hang at ffff:fff1."""
    return nl.qdisc(index, TC_H_CLSACT)


def is_our_tbf(q: TcObject | None) -> bool:
    return q is not None and q.kind == "tbf" and q.handle == TBF_HANDLE


def tbf_state(q: TcObject) -> TBFState | None:
    raw = q.options.get(TCA_TBF_PARMS)
    if q.kind != "tbf" or raw is None or len(raw) < _TBF_QOPT.size:
        return None
    fields = _TBF_QOPT.unpack_from(raw)
    rate = attr_u64(q.options, TCA_TBF_RATE64) or fields[5]
    return TBFState(handle=q.handle, rate=rate, limit=fields[12], buffer_ticks=fields[13])


def qdisc_stats(q: TcObject) -> QdiscStats:
    basic = q.stats2.get(TCA_STATS_BASIC, b"")
    queue = q.stats2.get(TCA_STATS_QUEUE, b"")
    nbytes, packets = struct.unpack_from("=QI", basic) if len(basic) >= 12 else (0, 0)
    qlen, backlog, drops, _requeues, overlimits = (
        struct.unpack_from("=IIIII", queue) if len(queue) >= 20 else (0, 0, 0, 0, 0)
    )
    return QdiscStats(nbytes, packets, drops, overlimits, backlog, qlen)


def our_filter(nl: Netlink, index: int) -> BPFFilter | None:
    for f in bpf_filters(nl, index):
        if f.prio == FILTER_PRIO and f.name.startswith("bwplugin:"):
            return f
    return None


def bpf_filters(nl: Netlink, index: int) -> list[BPFFilter]:
    out = []
    for f in nl.filters(index, CLSACT_INGRESS):
        if f.kind != "bpf" or f.handle == 0:
            continue  # handle 0 is the per-prio chain head, not a filter
        out.append(
            BPFFilter(
                prio=f.info >> 16,
                handle=f.handle,
                name=attr_str(f.options, TCA_BPF_NAME) or "",
                prog_id=attr_u32(f.options, TCA_BPF_ID) or 0,
                classid=attr_u32(f.options, TCA_BPF_CLASSID) or 0,
                direct_action=bool((attr_u32(f.options, TCA_BPF_FLAGS) or 0) & TCA_BPF_FLAG_ACT_DIRECT),
            )
        )
    return out
