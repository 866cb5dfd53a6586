"""A small rtnetlink client (links, qdiscs, filters) on a raw socket.

Why not pyroute2 here: its TBF encoder has no TCA_TBF_RATE64/TCA_TBF_BURST, so
multi-Gbit rates and big buckets wrap exactly as in the reference plugin, and
importing it costs ~120 ms on every plugin exec. The tests check what this
module builds with pyroute2 and tc(8) as independent readers."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from ..cni import settings

NETLINK_ROUTE = 0
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTCLASS, RTM_GETTCLASS = 40, 42
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK = 1, 3, 4, 5
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_STATS64, IFLA_AF_SPEC = 18, 20, 23, 26
# IFLA_AF_SPEC > AF_INET6 > IFLA_INET6_ADDR_GEN_MODE = IN6_ADDR_GEN_MODE_NONE
AF_INET6, IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 10, 8, 1
# IFLA_GSO_MAX_SIZE, IFLA_GRO_MAX_SIZE, IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE (6.3+)
IFLA_GSO_GRO_MAX_SIZES = (41, 58, 63, 64)
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFF_UP = 0x1

CLONE_NEWNET = 0x40000000
SOL_NETLINK = 270

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_TCMSG = struct.Struct("=BxxxiIII")


class NetlinkError(OSError):
    """A negative ack from the kernel, with its extended-ack message if any."""

    def __init__(self, err: int, msg: str, what: str) -> None:
        text = f"{what}: {os.strerror(err)}" + (f" ({msg})" if msg else "")
        super().__init__(err, text)
        self.ext_msg = msg


# ---------------------------------------------------------------- attributes


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def nla_u64(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=Q", value))


def nla_str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def nla_nested(kind: int, *children: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(children))


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def attr_str(attrs: dict[int, bytes], kind: int) -> str | None:
    raw = attrs.get(kind)
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


def attr_u32(attrs: dict[int, bytes], kind: int) -> int | None:
    raw = attrs.get(kind)
    return None if raw is None or len(raw) < 4 else int(struct.unpack_from("=I", raw)[0])


def attr_u64(attrs: dict[int, bytes], kind: int) -> int | None:
    raw = attrs.get(kind)
    return None if raw is None or len(raw) < 8 else int(struct.unpack_from("=Q", raw)[0])


# ---------------------------------------------------------------- messages


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(0, 0, index, flags, change)


def tcmsg(index: int, handle: int = 0, parent: int = 0, info: int = 0) -> bytes:
    return _TCMSG.pack(0, index, handle, parent, info)


@dataclass
class Link:
    index: int
    name: str
    kind: str | None
    mtu: int
    flags: int
    peer_index: int | None  # IFLA_LINK: for a veth, the peer's ifindex
    alias: str | None
    mac: str
    tx_packets: int = 0  # from IFLA_STATS64
    gso_max: int = 65536  # the largest GSO/GRO packet it may build or pass (BIG TCP: more)

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


def parse_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    attrs = parse_attrs(payload[_IFINFOMSG.size :])
    info = parse_attrs(attrs.get(IFLA_LINKINFO, b""))
    mac = attrs.get(IFLA_ADDRESS, b"")
    return Link(
        index=index,
        name=attr_str(attrs, IFLA_IFNAME) or "",
        kind=attr_str(info, IFLA_INFO_KIND),
        mtu=attr_u32(attrs, IFLA_MTU) or 0,
        flags=flags,
        peer_index=attr_u32(attrs, IFLA_LINK),
        alias=attr_str(attrs, IFLA_IFALIAS),
        mac=":".join(f"{b:02x}" for b in mac),
        tx_packets=_tx_packets(attrs.get(IFLA_STATS64)),
        gso_max=max([65536, *(attr_u32(attrs, a) or 0 for a in IFLA_GSO_GRO_MAX_SIZES)]),
    )


def _tx_packets(stats64: bytes | None) -> int:
    # struct rtnl_link_stats64 starts rx_packets, tx_packets
    return int(struct.unpack_from("=QQ", stats64)[1]) if stats64 and len(stats64) >= 16 else 0


@dataclass
class TcObject:
    """A qdisc or filter as dumped: header fields plus raw attributes."""

    index: int
    handle: int
    parent: int
    info: int
    kind: str
    options: dict[int, bytes] = field(default_factory=dict)
    stats2: dict[int, bytes] = field(default_factory=dict)
    raw_options: bytes = b""  # TCA_OPTIONS as sent (fifo qdiscs: a bare struct, not attributes)


def parse_tc(payload: bytes) -> TcObject:
    _family, index, handle, parent, info = _TCMSG.unpack_from(payload)
    attrs = parse_attrs(payload[_TCMSG.size :])
    return TcObject(
        index=index,
        handle=handle,
        parent=parent,
        info=info,
        kind=attr_str(attrs, 1) or "",  # TCA_KIND
        options=parse_attrs(attrs.get(2, b"")),  # TCA_OPTIONS
        stats2=parse_attrs(attrs.get(7, b"")),  # TCA_STATS2
        raw_options=attrs.get(2, b""),
    )


# ---------------------------------------------------------------- socket


T = TypeVar("T")


def in_helper_thread(fn: Callable[[], T], name: str) -> T:
    """Run fn in a new thread and return its result (or raise its exception). A
    thread can change its own network namespace without moving the caller's."""
    box: list[T | BaseException] = []

    def worker() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the caller below
            box.append(exc)

    thread = threading.Thread(target=worker, name=name)
    thread.start()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class Netlink:
    """One rtnetlink socket, in whatever netns it was created in."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock or _new_socket()
        self.seq = 0
        # the kernel's extended-ACK messages on requests that succeeded (HTB's "quantum
        # of class is big", say): kept in order and logged, never silently dropped
        self.warnings: list[str] = []

    @classmethod
    def in_netns(cls, path: str) -> Netlink:
        """A socket inside the netns at `path`. setns() runs in a helper thread, so this
        process's own threads never leave their namespace."""

        def enter() -> socket.socket:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            return _new_socket()

        return cls(in_helper_thread(enter, "bwplugin-setns"))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, msg_type: int, flags: int, body: bytes) -> int:
        self.seq += 1
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags | NLM_F_REQUEST, self.seq, 0)
        self.sock.send(hdr + body)
        return self.seq

    def _messages(self, seq: int, what: str) -> Iterator[tuple[int, bytes]]:
        """Yield (type, payload) for our seq until DONE or an ack; raise on error."""
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                payload = data[off + _NLMSGHDR.size : off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    msg = ""
                    if flags & NLM_F_ACK_TLVS:
                        # with NETLINK_CAP_ACK the echoed request is its header only
                        tlvs = parse_attrs(payload[4 + _NLMSGHDR.size :])
                        msg = attr_str(tlvs, NLMSGERR_ATTR_MSG) or ""
                    if err == 0:
                        if msg:
                            self.warnings.append(f"{what}: {msg}")
                            settings.log(f"kernel warning on {what}: {msg}")
                        return
                    raise NetlinkError(err, msg, what)
                yield mtype, payload
                if not flags & NLM_F_MULTI:
                    return

    def request(self, msg_type: int, flags: int, body: bytes, what: str) -> list[bytes]:
        seq = self._send(msg_type, flags | NLM_F_ACK, body)
        return [p for _t, p in self._messages(seq, what)]

    def dump(self, msg_type: int, body: bytes, what: str) -> list[bytes]:
        seq = self._send(msg_type, NLM_F_DUMP, body)
        return [p for _t, p in self._messages(seq, what)]

    # ------------------------------------------------------------ links

    def link(self, *, name: str | None = None, index: int = 0) -> Link | None:
        body = ifinfomsg(index) + (nla_str(IFLA_IFNAME, name) if name else b"")
        try:
            replies = self.request(RTM_GETLINK, 0, body, f"get link {name or index}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return parse_link(replies[0]) if replies else None

    def links(self) -> list[Link]:
        return [parse_link(p) for p in self.dump(RTM_GETLINK, ifinfomsg(), "dump links")]

    def create_link(self, name: str, kind: str, mtu: int = 0) -> None:
        attrs = nla_str(IFLA_IFNAME, name) + nla_nested(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, kind))
        if mtu:
            attrs += nla_u32(IFLA_MTU, mtu)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, ifinfomsg() + attrs, f"create {kind} {name}")

    def create_veth(self, name: str, peer: str) -> None:
        peer_info = nla(VETH_INFO_PEER, ifinfomsg() + nla_str(IFLA_IFNAME, peer))
        info = nla_str(IFLA_INFO_KIND, "veth") + nla_nested(IFLA_INFO_DATA, peer_info)
        attrs = nla_str(IFLA_IFNAME, name) + nla_nested(IFLA_LINKINFO, info)
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, ifinfomsg() + attrs, f"create veth {name}")

    def set_link(self, index: int, *, up: bool | None = None, alias: str | None = None) -> None:
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        attrs = nla_str(IFLA_IFALIAS, alias) if alias is not None else b""
        self.request(RTM_NEWLINK, 0, ifinfomsg(index, flags, change) + attrs, f"set link {index}")

    def silence_ipv6(self, index: int) -> None:
        """No IPv6 link-local address, so the device sends nothing of its own (MLD,
        router solicitations). Must come before the device goes up: the kernel
        rejects this at creation and, in one message with IFF_UP, applies it after
        the address is made. Without IPv6 in the kernel there is nothing to silence."""
        mode = nla(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
        attrs = nla_nested(IFLA_AF_SPEC, nla_nested(AF_INET6, mode))
        try:
            self.request(RTM_NEWLINK, 0, ifinfomsg(index) + attrs, f"silence IPv6 on link {index}")
        except NetlinkError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                raise

    def delete_link(self, index: int) -> bool:
        """Delete; False if it was already gone."""
        try:
            self.request(RTM_DELLINK, 0, ifinfomsg(index), f"delete link {index}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    # ------------------------------------------------------------ tc

    def qdisc(self, index: int, parent: int) -> TcObject | None:
        """One device's qdisc at `parent` (root or ingress) by a GET, not a dump of
        the whole node's qdiscs: constant time however many pods are shaped."""
        try:
            # without ECHO the kernel only multicasts the answer to RTNLGRP_TC
            replies = self.request(RTM_GETQDISC, NLM_F_ECHO, tcmsg(index, 0, parent), f"get qdisc on {index}")
        except NetlinkError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return None
            raise
        return parse_tc(replies[0]) if replies else None

    def classes(self, index: int) -> list[TcObject]:
        try:
            return [parse_tc(p) for p in self.dump(RTM_GETTCLASS, tcmsg(index), f"dump classes on {index}")]
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                return []
            raise

    def filters(self, index: int, parent: int) -> list[TcObject]:
        body = tcmsg(index, 0, parent)
        try:
            return [parse_tc(p) for p in self.dump(RTM_GETTFILTER, body, f"dump filters on {index}")]
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                return []
            raise


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    sock.bind((0, 0))
    return sock


_LIBC: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC
