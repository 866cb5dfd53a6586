"""The eBPF side: raw bpf(2) syscalls, bpffs pins, and the once-per-node compile.

bcc is imported only to compile (first ADD on a node, or after an upgrade); every
other ADD/DEL/CHECK reuses the pinned program and map through plain syscalls."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import struct
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from ..cni import settings
from ..cni.errors import BPFUnavailableError, TryAgainLaterError
from .naming import attachment_digest

BPF_NOEXIST, BPF_EXIST = 1, 2

BPFFS = "/sys/fs/bpf"
MAP_LAYOUT = 3  # bump when bwp_val/bwp_lpm_key change; the map pins are versioned by it
MAX_ATTACH = 65535  # ids are 16-bit: skb->tc_classid is a u16 (qdisc_skb_cb)
MAX_SUBNETS = 1 << 22  # LPM entries node-wide (allocated on use, not up front)
PROGRAMS = (
    "bwp_count_from_pod",
    "bwp_from_pod",
    "bwp_from_pod_mirred",
    "bwp_to_pod",
    "bwp_tcx_from_pod",
    "bwp_tcx_to_pod",
)

# bwp_val.flags (see bpf/bwplugin.c)
F_EGRESS_SHAPED, F_INGRESS_SHAPED, F_SUBNETS, F_LISTED_UNSHAPED = 1, 2, 4, 8
F_COUNT_TO_POD, F_COUNT_FROM_POD = 16, 32  # counting is on (ADD sets them once each direction is in place)
F_COUNTING = F_COUNT_TO_POD | F_COUNT_FROM_POD
# bwp_shaping.flags: which settings a live change overrides, and what ADD knew
S_INGRESS_OVERRIDE, S_EGRESS_OVERRIDE, S_SUBNETS_OVERRIDE = 1, 2, 4
S_STATIC = 8  # ADD's rates came from the conflist's own keys, not from runtimeConfig
S_REDIRECT_BPF, S_REDIRECT_MIRRED = 16, 32  # egressRedirect forced (neither: auto)
S_SHAPED_LIST = 64  # under S_SUBNETS_OVERRIDE: the list is shapedSubnets
S_CLSACT_SHARED = 128  # the veth's clsact was there before ADD (another tool's): never ours to delete
S_TCX = 256  # counted by TCX links (bwp_tcx_*), not by cls_bpf filters
S_TCX_PENDING = 512  # counted by cls_bpf filters until the agent moves the counting to TCX links
# bwp_tcx values (see bpf/bwplugin.c): the attachment id, and whether its TCX programs count
TCX_ID, TCX_COUNTS = 0xFFFF, 0x10000
S_OVERRIDES = S_INGRESS_OVERRIDE | S_EGRESS_OVERRIDE | S_SUBNETS_OVERRIDE
INGRESS, EGRESS = 0, 1  # bwp_shaping's array indices

KEY = struct.Struct("=I")  # attachment id (the filters' classid)
VAL = struct.Struct("=IIIIQQ8Q16s128s")  # struct bwp_val
LPM_KEY = struct.Struct("=IHBx16s")  # struct bwp_lpm_key
LPM_VAL = struct.Struct("=B")
POD_VAL = struct.Struct("=64s256s64s")  # struct bwp_pod
SHAPING_VAL = struct.Struct("=8QQIIIIII")  # struct bwp_shaping
CID_MAX = 127


def pin_dir() -> Path:
    return Path(settings.get("BWPLUGIN_PIN_DIR") or f"{BPFFS}/bwplugin")


def source_path() -> Path:
    override = settings.get("BWPLUGIN_BPF_DIR")
    if override:
        return Path(override) / "bwplugin.c"
    package = Path(__file__).resolve().parent.parent
    wheel = package / "ebpf" / "bwplugin.c"  # installed from a wheel (package data)
    return wheel if wheel.exists() else package.parent / "bpf" / "bwplugin.c"  # a checkout or a --lib copy


def lock_path(name: str = "bpf.lock") -> Path:
    return Path(settings.get("BWPLUGIN_RUN_DIR") or "/run/bwplugin") / name


# ---------------------------------------------------------------- bpf(2), through libbpf

# libbpf (Debian's libbpf1) makes the bpf(2) calls: the syscall number and the
# attribute layout are the library's business, on every architecture a node runs.
LIBBPF = "libbpf.so.1"
_lib: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(LIBBPF, use_errno=True)
        except OSError as exc:
            raise BPFUnavailableError(f"libbpf ({LIBBPF}, Debian package libbpf1) cannot be loaded: {exc}") from exc
        for name in (
            "bpf_obj_get",
            "bpf_obj_pin",
            "bpf_obj_get_info_by_fd",
            "bpf_map_lookup_elem",
            "bpf_map_update_elem",
            "bpf_map_delete_elem",
            "bpf_map_get_next_key",
            "bpf_map_lookup_batch",
            "bpf_link_create",
            "bpf_link_detach",
            "bpf_prog_query",
            "bpf_prog_get_fd_by_id",
        ):
            getattr(lib, name).restype = ctypes.c_int
        lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        _lib = lib  # fmt: skip
    return _lib


def _check(ret: int) -> int:
    """libbpf 1.x returns -errno on failure."""
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def obj_get(path: str | Path) -> int:
    return _check(libbpf().bpf_obj_get(str(path).encode()))


def obj_pin(fd: int, path: str | Path) -> None:
    _check(libbpf().bpf_obj_pin(fd, str(path).encode()))


def obj_id(fd: int) -> int:
    """The kernel id of a prog or map fd (bpf_{prog,map}_info.id at offset 4)."""
    info = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(256)
    _check(libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)))
    return int(struct.unpack_from("=I", info.raw, 4)[0])


# ---------------------------------------------------------------- TCX links (Linux 6.6+)

BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47  # enum bpf_attach_type
BPF_LINK_TYPE_TCX = 11
BPF_F_BEFORE = 1 << 3  # with no relative program: in front of every other


class _LinkCreateOpts(ctypes.Structure):
    # the head of libbpf's struct bpf_link_create_opts: sz, flags (the rest stays 0,
    # so libbpf 1.1, which predates TCX, passes the attach type and flags through)
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def link_create(prog_fd: int, ifindex: int, attach_type: int, flags: int) -> int:
    opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), flags, 0)
    return _check(libbpf().bpf_link_create(prog_fd, ifindex, attach_type, ctypes.byref(opts)))


def link_detach(fd: int) -> None:
    _check(libbpf().bpf_link_detach(fd))


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    ifindex: int  # 0: defunct (its device is gone)
    attach_type: int


def link_info(fd: int) -> LinkInfo:
    info = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(256)
    _check(libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)))
    kind, link_id, prog_id = struct.unpack_from("=III", info.raw, 0)
    ifindex, attach_type = struct.unpack_from("=II", info.raw, 16)  # the union is 8-byte aligned
    return LinkInfo(kind, link_id, prog_id, ifindex, attach_type)


def prog_query(ifindex: int, attach_type: int) -> list[int]:
    """The ids of the programs on a TCX hook, in the order they run."""
    ids = (ctypes.c_uint32 * 64)()
    count, flags = ctypes.c_uint32(64), ctypes.c_uint32(0)
    _check(libbpf().bpf_prog_query(ifindex, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)))
    return list(ids[: count.value])


def prog_name(prog_id: int) -> str:
    """A program's name (bpf_prog_info.name, 16 bytes at offset 64), or "?"."""
    try:
        fd = _check(libbpf().bpf_prog_get_fd_by_id(prog_id))
    except OSError:
        return "?"
    try:
        info = ctypes.create_string_buffer(256)
        size = ctypes.c_uint32(256)
        _check(libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)))
        return info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def tcx_claim(fd: int, map_fd: int, ifindex: int, attach_id: int, counts: bool = True) -> bool:
    """Point the TCX programs on this ifindex at the attachment (counting, or only
    classifying until the agent's handover: tcx_count); False if another live
    attachment holds the ifindex (a veth of that index in another netns)."""
    key = KEY.pack(ifindex)
    old = map_lookup(fd, key, KEY.size)
    if old is not None:
        holder = KEY.unpack(old)[0] & TCX_ID
        if holder != attach_id and attach_get(map_fd, holder) is not None:
            return False
        map_delete(fd, key)  # a stale claim: its attachment is gone
    try:
        map_update(fd, key, KEY.pack(attach_id | (TCX_COUNTS if counts else 0)), BPF_NOEXIST)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False  # a concurrent ADD on the same ifindex won
        raise
    return True


def tcx_count(fd: int, ifindex: int, attach_id: int, counts: bool = True) -> None:
    """The handover: from this write on the TCX programs count the attachment, and
    its cls_bpf counters skip what they counted (one atomic value replace); or,
    counts=False, back to the cls_bpf counters alone."""
    map_update(fd, KEY.pack(ifindex), KEY.pack(attach_id | (TCX_COUNTS if counts else 0)), BPF_EXIST)


def tcx_release(fd: int, ifindex: int, attach_id: int) -> None:
    """Drop the ifindex's claim, only if it is this attachment's."""
    raw = map_lookup(fd, KEY.pack(ifindex), KEY.size)
    if raw is not None and KEY.unpack(raw)[0] & TCX_ID == attach_id:
        map_delete(fd, KEY.pack(ifindex))


def tcx_claim_of(fd: int, ifindex: int, raw: bool = False) -> int | None:
    """One ifindex's claim: the attachment id (raw: the value, with TCX_COUNTS)."""
    value = map_lookup(fd, KEY.pack(ifindex), KEY.size)
    return None if value is None else KEY.unpack(value)[0] & _claim_mask(raw)


def tcx_claims(fd: int, raw: bool = False) -> dict[int, int]:
    """ifindex -> attachment id (raw: the value, with TCX_COUNTS)."""
    mask = _claim_mask(raw)
    return {KEY.unpack(k)[0]: KEY.unpack(v)[0] & mask for k, v in map_items(fd, KEY.size, KEY.size)}


def _claim_mask(raw: bool) -> int:
    return 0xFFFFFFFF if raw else TCX_ID


def tcx_drop_stale(fd: int, map_fd: int, ifindex: int | None = None) -> int:
    """Drop claims whose attachment is gone (its entry deleted by hand, a DEL that
    died half-way): of one ifindex, or (None) of all. Returns how many."""
    if ifindex is None:
        claims = tcx_claims(fd)
    else:
        raw = map_lookup(fd, KEY.pack(ifindex), KEY.size)
        claims = {ifindex: KEY.unpack(raw)[0] & TCX_ID} if raw is not None else {}
    dropped = 0
    for index, attach_id in claims.items():
        entry = attach_get(map_fd, attach_id)
        if entry is None or entry.host_index != index:
            dropped += map_delete(fd, KEY.pack(index))
    return dropped


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    v = ctypes.create_string_buffer(value_size)
    ret = libbpf().bpf_map_lookup_elem(fd, key, v)
    if ret == -errno.ENOENT:
        return None
    _check(ret)
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _check(libbpf().bpf_map_update_elem(fd, key, value, flags))


def map_delete(fd: int, key: bytes) -> bool:
    ret = libbpf().bpf_map_delete_elem(fd, key)
    if ret == -errno.ENOENT:
        return False
    _check(ret)
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    prev: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        ret = libbpf().bpf_map_get_next_key(fd, prev, nxt)
        if ret == -errno.ENOENT:
            return keys
        _check(ret)
        prev = nxt.raw
        keys.append(prev)


def map_items(fd: int, key_size: int, value_size: int, chunk: int = 1024) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, in a few BPF_MAP_LOOKUP_BATCH calls rather
    than two syscalls per entry (a node may shape thousands of pods)."""
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    token_in = ctypes.create_string_buffer(8)
    token_out = ctypes.create_string_buffer(8)
    out: list[tuple[bytes, bytes]] = []
    first = True
    while True:
        count = ctypes.c_uint32(chunk)
        ret = libbpf().bpf_map_lookup_batch(
            fd, None if first else token_in, token_out, keys, values, ctypes.byref(count), None
        )
        if ret < 0 and ret != -errno.ENOENT:
            if first and -ret in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel < 5.6
                return [(k, v) for k in map_keys(fd, key_size) if (v := map_lookup(fd, k, value_size)) is not None]
            _check(ret)
        kraw, vraw = keys.raw, values.raw  # .raw copies the whole buffer: once per batch
        for i in range(count.value):
            out.append((kraw[i * key_size : (i + 1) * key_size], vraw[i * value_size : (i + 1) * value_size]))
        if ret < 0:  # ENOENT: that was the last batch
            return out
        ctypes.memmove(token_in, token_out, 8)
        first = False


# ---------------------------------------------------------------- attach map


@dataclass(frozen=True)
class Counter:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class AttachEntry:
    """One attachment's row in the pinned map (struct bwp_val)."""

    ifb_index: int
    host_index: int
    flags: int
    owner: int
    network: int
    ifname: str
    container_id: str
    from_pod_shaped: Counter = Counter()
    from_pod_unshaped: Counter = Counter()
    to_pod_shaped: Counter = Counter()
    to_pod_unshaped: Counter = Counter()

    def pack(self) -> bytes:
        counts = (self.from_pod_shaped, self.from_pod_unshaped, self.to_pod_shaped, self.to_pod_unshaped)
        return VAL.pack(
            self.ifb_index, self.host_index, self.flags, 0, self.owner, self.network,
            *(n for c in counts for n in (c.packets, c.bytes)),
            self.ifname.encode()[:15], self.container_id.encode()[:CID_MAX],
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> AttachEntry:
        f = VAL.unpack_from(raw)
        return cls(
            ifb_index=f[0], host_index=f[1], flags=f[2], owner=f[4], network=f[5],
            ifname=f[14].split(b"\0", 1)[0].decode(errors="replace"),
            container_id=f[15].split(b"\0", 1)[0].decode(errors="replace"),
            from_pod_shaped=Counter(f[6], f[7]), from_pod_unshaped=Counter(f[8], f[9]),
            to_pod_shaped=Counter(f[10], f[11]), to_pod_unshaped=Counter(f[12], f[13]),
        )  # fmt: skip


def attach_key(attach_id: int) -> bytes:
    return KEY.pack(attach_id)


def attach_new(map_fd: int, entry: AttachEntry) -> int:
    """Insert an entry under a fresh random id. BPF_NOEXIST makes the insert the
    allocation: two concurrent ADDs can never get the same id, and no lock is needed."""
    value = entry.pack()
    start = secrets.randbelow(MAX_ATTACH)
    for step in range(MAX_ATTACH):  # random start, then probe: ids 1..65535 (0 = no classid)
        attach_id = (start + step) % MAX_ATTACH + 1
        try:
            map_update(map_fd, attach_key(attach_id), value, BPF_NOEXIST)
            return attach_id
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    raise OSError(errno.ENOSPC, f"all {MAX_ATTACH} attachment ids are in use")


def attach_update(map_fd: int, attach_id: int, *, ifb_index: int | None = None, flags: int | None = None) -> None:
    """Rewrite an entry's ifb_index or flags. The value is written whole, so the
    counts the programs add between this read and the write are lost: none at
    ADD (no filter runs yet), a few microseconds' worth in a live change."""
    entry = attach_get(map_fd, attach_id)
    if entry is None:
        raise OSError(errno.ENOENT, f"attach map entry {attach_id} vanished")
    entry = replace(
        entry,
        ifb_index=entry.ifb_index if ifb_index is None else ifb_index,
        flags=entry.flags if flags is None else flags,
    )
    map_update(map_fd, attach_key(attach_id), entry.pack(), BPF_EXIST)


def attach_get(map_fd: int, attach_id: int) -> AttachEntry | None:
    raw = map_lookup(map_fd, attach_key(attach_id), VAL.size)
    return None if raw is None else AttachEntry.unpack(raw)


def attach_entries(map_fd: int) -> dict[int, AttachEntry]:
    return {KEY.unpack(k)[0]: AttachEntry.unpack(v) for k, v in map_items(map_fd, KEY.size, VAL.size)}


def owner_entries(map_fd: int, owner: int) -> dict[int, AttachEntry]:
    """The entries of one (network, container, ifname), from one batch read; only
    those are decoded, so a DEL stays cheap on a node with many pods."""
    return {
        KEY.unpack(k)[0]: AttachEntry.unpack(v)
        for k, v in map_items(map_fd, KEY.size, VAL.size)
        if _OWNER.unpack_from(v, 16)[0] == owner
    }


_OWNER = struct.Struct("=Q")


def release(map_fd: int, lpm_fd: int | None, attach_id: int) -> None:
    """Forget an attachment: its prefixes first (walking the trie only if it has
    any) and its pod, then its id, which frees it for reuse."""
    entry = attach_get(map_fd, attach_id)
    if entry is None:
        return
    if lpm_fd is not None and entry.flags & F_SUBNETS:
        subnets_delete(lpm_fd, attach_id)
    for fd in (open_pods(), open_shaping()):
        if fd is not None:
            try:
                map_delete(fd, attach_key(attach_id))
            finally:
                close_fds(fd)
    tcx_fd = open_tcx()
    if tcx_fd is not None:
        try:
            tcx_release(tcx_fd, entry.host_index, attach_id)
        finally:
            close_fds(tcx_fd)
    map_delete(map_fd, attach_key(attach_id))


# ---------------------------------------------------------------- pods (who owns an attachment)


@dataclass(frozen=True)
class PodEntry:
    namespace: str
    name: str
    uid: str

    def pack(self) -> bytes:
        return POD_VAL.pack(self.namespace.encode()[:63], self.name.encode()[:255], self.uid.encode()[:63])

    @classmethod
    def unpack(cls, raw: bytes) -> PodEntry:
        return cls(*(f.split(b"\0", 1)[0].decode(errors="replace") for f in POD_VAL.unpack_from(raw)))


def pod_set(pods_fd: int, attach_id: int, pod: PodEntry) -> None:
    map_update(pods_fd, attach_key(attach_id), pod.pack())


def pod_entries(pods_fd: int) -> dict[int, PodEntry]:
    return {KEY.unpack(k)[0]: PodEntry.unpack(v) for k, v in map_items(pods_fd, KEY.size, POD_VAL.size)}


# ---------------------------------------------------------------- shaping (rates in force)


@dataclass(frozen=True)
class ShapingEntry:
    """struct bwp_shaping: rates as (bits/s, bits) pairs, (0, 0) for unshaped;
    index INGRESS (to the pod) or EGRESS (from it)."""

    add: tuple[tuple[int, int], tuple[int, int]]
    now: tuple[tuple[int, int], tuple[int, int]]
    subnets_digest: int
    latency_us: int
    max_burst_us: int
    mtu: int
    gso_max: int
    flags: int
    changes: int = 0

    def pack(self) -> bytes:
        return SHAPING_VAL.pack(
            self.add[0][0], self.add[1][0], self.add[0][1], self.add[1][1],
            self.now[0][0], self.now[1][0], self.now[0][1], self.now[1][1],
            self.subnets_digest, self.latency_us, self.max_burst_us, self.mtu, self.gso_max, self.flags, self.changes,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> ShapingEntry:
        f = SHAPING_VAL.unpack_from(raw)
        return cls(((f[0], f[2]), (f[1], f[3])), ((f[4], f[6]), (f[5], f[7])), *f[8:])


def subnets_digest(nets: Iterable[IPv4Network | IPv6Network]) -> int:
    """Order-free digest of a prefix list (0 for none)."""
    text = ",".join(sorted(str(n) for n in nets))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") if text else 0


def shaping_set(fd: int, attach_id: int, entry: ShapingEntry) -> None:
    map_update(fd, attach_key(attach_id), entry.pack())


def shaping_get(fd: int, attach_id: int) -> ShapingEntry | None:
    raw = map_lookup(fd, attach_key(attach_id), SHAPING_VAL.size)
    return None if raw is None else ShapingEntry.unpack(raw)


def shaping_entries(fd: int) -> dict[int, ShapingEntry]:
    return {KEY.unpack(k)[0]: ShapingEntry.unpack(v) for k, v in map_items(fd, KEY.size, SHAPING_VAL.size)}


def owner_hash(network: str, container_id: str, ifname: str) -> int:
    return int.from_bytes(attachment_digest(network, container_id, ifname)[:8], "little")


def network_hash(network: str) -> int:
    return int.from_bytes(hashlib.sha256(network.encode()).digest()[:8], "little")


# ---------------------------------------------------------------- subnets (LPM trie)


def lpm_key(attach_id: int, net: IPv4Network | IPv6Network) -> bytes:
    family = 4 if net.version == 4 else 6
    return LPM_KEY.pack(32 + net.prefixlen, attach_id, family, net.network_address.packed.ljust(16, b"\0"))


def subnets_add(lpm_fd: int, attach_id: int, nets: tuple[IPv4Network | IPv6Network, ...]) -> None:
    for net in nets:
        map_update(lpm_fd, lpm_key(attach_id, net), LPM_VAL.pack(1))


def subnets_of(lpm_fd: int, attach_id: int) -> list[IPv4Network | IPv6Network]:
    out: list[IPv4Network | IPv6Network] = []
    for key in map_keys(lpm_fd, LPM_KEY.size):
        prefixlen, kid, family, addr = LPM_KEY.unpack(key)
        if kid != attach_id:
            continue
        if family == 4:
            out.append(IPv4Network((addr[:4], prefixlen - 32)))
        else:
            out.append(IPv6Network((addr, prefixlen - 32)))
    return out


def subnets_delete(lpm_fd: int, attach_id: int) -> int:
    """Delete every prefix of one attachment (a full walk: the trie has no index by id)."""
    doomed = [k for k in map_keys(lpm_fd, LPM_KEY.size) if LPM_KEY.unpack(k)[1] == attach_id]
    return sum(map_delete(lpm_fd, k) for k in doomed)


# ---------------------------------------------------------------- programs


@dataclass
class Programs:
    """The pinned programs and maps of one compiled version, opened by fd."""

    fds: dict[str, int]  # program name -> fd
    map_fd: int
    lpm_fd: int
    pods_fd: int
    shaping_fd: int
    version: str  # digest of source + layout: part of every pin and filter name
    tcx_fd: int = -1  # the ifindex -> attachment id map of the TCX programs

    def fd(self, name: str) -> int:
        return self.fds[name]

    def filter_name(self, name: str) -> str:
        # cls_bpf keeps this name; it ties an attached filter to the pin it came from
        return f"bwplugin:{name}_{self.version}"

    def prog_id(self, name: str) -> int:
        return obj_id(self.fds[name])

    def close(self) -> None:
        for fd in (*self.fds.values(), self.map_fd, self.lpm_fd, self.pods_fd, self.shaping_fd, self.tcx_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def map_path() -> Path:
    return pin_dir() / f"attach_v{MAP_LAYOUT}"


def lpm_path() -> Path:
    return pin_dir() / f"subnets_v{MAP_LAYOUT}"


def pods_path() -> Path:
    return pin_dir() / f"pods_v{MAP_LAYOUT}"


def shaping_path() -> Path:
    return pin_dir() / f"shaping_v{MAP_LAYOUT}"


def tcx_path() -> Path:
    return pin_dir() / f"tcx_v{MAP_LAYOUT}"


_DIGESTS: dict[tuple[Path, float], str] = {}


def version() -> str:
    """Digest of the C source and map layout: a changed program gets new pins."""
    src = source_path()
    try:
        key = (src, src.stat().st_mtime)
        if key not in _DIGESTS:
            _DIGESTS[key] = _digest(src)
    except OSError as exc:
        raise BPFUnavailableError(f"eBPF source {src} cannot be read: {exc.strerror}") from exc
    return _DIGESTS[key]


def _digest(src: Path) -> str:
    return hashlib.sha256(src.read_bytes() + f"layout={MAP_LAYOUT}".encode()).hexdigest()[:12]


def prog_path(name: str, ver: str | None = None) -> Path:
    return pin_dir() / f"{name}_{ver or version()}"


def open_pinned() -> Programs | None:
    ver = version()
    fds: dict[str, int] = {}
    try:
        for name in PROGRAMS:
            fds[name] = obj_get(prog_path(name, ver))
        maps = (
            ("map", map_path()), ("lpm", lpm_path()), ("pods", pods_path()), ("shaping", shaping_path()),
            ("tcx", tcx_path()),
        )  # fmt: skip
        for name, path in maps:
            fds[name] = obj_get(path)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        return None
    map_fd, lpm_fd, pods_fd, shaping_fd, tcx_fd = (fds.pop(name) for name, _path in maps)  # fds: programs only
    return Programs(fds, map_fd, lpm_fd, pods_fd, shaping_fd, ver, tcx_fd)


def close_fds(*fds: int | None) -> None:
    """Close the map fds that were opened (an open_* answers None for a missing pin)."""
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _open_pin(path: Path) -> int | None:
    try:
        return obj_get(path)
    except OSError:
        return None


def open_map() -> int | None:
    """The attach map alone (DEL and GC need no program)."""
    return _open_pin(map_path())


def open_lpm() -> int | None:
    return _open_pin(lpm_path())


def open_pods() -> int | None:
    return _open_pin(pods_path())


def open_shaping() -> int | None:
    return _open_pin(shaping_path())


def open_tcx() -> int | None:
    return _open_pin(tcx_path())


def programs() -> Programs:
    """The pinned programs, compiling and pinning them first if this node has none."""
    progs = open_pinned()
    if progs is not None:
        return progs
    ensure_bpffs()
    with node_lock():
        progs = open_pinned()  # somebody else may have compiled while we waited
        if progs is None:
            compile_in_child()
            progs = open_pinned()
            if progs is None:
                raise BPFUnavailableError(f"the compiled programs were not pinned under {pin_dir()}")
    return progs


COMPILE_TIMEOUT = 120.0  # s: the compiler child is killed past this
LOCK_WAIT = 150.0  # s: longer than a compile can take (the child is killed at COMPILE_TIMEOUT)


@contextlib.contextmanager
def node_lock(wait: float | None = None, name: str = "bpf.lock") -> Iterator[None]:
    """Serialises compiling and probing on a node (or, by name, live changes);
    the kernel drops it if we die. A process that cannot get it in time answers
    "try again later" (code 11) rather than waiting without bound."""
    lock = lock_path(name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if wait is None:
        wait = float(settings.get("BWPLUGIN_LOCK_WAIT") or LOCK_WAIT)
    deadline = time.monotonic() + wait
    with open(lock, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TryAgainLaterError(
                        f"another bwplugin process has held {lock} for over {wait:g} s (compiling?)"
                    ) from None
                time.sleep(0.02)
        yield


def compile_in_child() -> None:
    """bcc and LLVM take ~100 MB that a long-lived agent would keep for good after
    compiling once; a short-lived child process returns it to the system."""
    import subprocess  # ~7 ms to import: only a cold compile needs it

    argv = [sys.executable, "-I", "-c", _CHILD, json.dumps(sys.path), str(source_path()), str(pin_dir())]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:  # an overloaded node: the runtime retries
        raise TryAgainLaterError(f"compiling the eBPF programs took over {COMPILE_TIMEOUT:g} s; killed") from exc
    if proc.returncode != 0:
        lines = proc.stdout.strip().splitlines()
        msg = lines[-1] if lines else f"the compiler process exited with {proc.returncode}"
        raise BPFUnavailableError(msg, proc.stderr[-4000:])


_CHILD = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from bwplugin.datapath.bpf import compile_and_pin
from bwplugin.cni.errors import CNIError
try:
    compile_and_pin(sys.argv[2], sys.argv[3])
except CNIError as exc:
    print(exc.msg)
    sys.stderr.write(exc.details)
    raise SystemExit(1)
"""


def compile_and_pin(src: str, pins: str) -> None:
    """Runs in the child: compile with bcc, pin every program, unpin old versions."""
    pdir = Path(pins)
    pdir.mkdir(parents=True, exist_ok=True)
    ver = _digest(Path(src))
    try:
        from bcc import BPF  # heavy (LLVM); only here
    except ImportError as exc:
        raise BPFUnavailableError("bcc (python3-bpfcc) is not importable, and no compiled program is pinned") from exc
    cflags = [
        f'-DBWP_MAP_PIN="{pdir}/attach_v{MAP_LAYOUT}"',
        f'-DBWP_LPM_PIN="{pdir}/subnets_v{MAP_LAYOUT}"',
        f'-DBWP_POD_PIN="{pdir}/pods_v{MAP_LAYOUT}"',
        f'-DBWP_SHAPING_PIN="{pdir}/shaping_v{MAP_LAYOUT}"',
        f'-DBWP_TCX_PIN="{pdir}/tcx_v{MAP_LAYOUT}"',
        f"-DBWP_MAX_ATTACH={MAX_ATTACH}",
        f"-DBWP_MAX_SUBNETS={MAX_SUBNETS}",
        "-w",
    ]
    with _stderr_to_tempfile() as log:
        try:
            bcc = BPF(src_file=src.encode(), cflags=cflags)
            fns = {name: bcc.load_func(name.encode(), BPF.SCHED_CLS) for name in PROGRAMS}
        except Exception as exc:
            raise BPFUnavailableError(f"compiling {src} failed: {exc}", log.read()) from exc
    for name, fn in fns.items():
        target = pdir / f"{name}_{ver}"
        with contextlib.suppress(FileNotFoundError):
            target.unlink()  # a half-finished earlier compile
        obj_pin(fn.fd, target)
    for old in pdir.iterdir():  # older versions' programs; attached filters keep them alive
        if old.name.startswith(PROGRAMS) and not old.name.endswith(ver):
            with contextlib.suppress(OSError):
                old.unlink()
    bcc.cleanup()


class _stderr_to_tempfile:
    """bcc's C side prints noise ("modprobe: not found") on fd 2, which would reach
    the runtime's logs; keep it, and show it only if compilation fails."""

    def __enter__(self) -> _stderr_to_tempfile:
        self.file = tempfile.TemporaryFile(mode="w+")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def read(self) -> str:
        self.file.seek(0)
        return self.file.read()[-4000:]

    def __exit__(self, *exc: object) -> None:
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.close()


def ensure_bpffs() -> None:
    if os.path.ismount(BPFFS):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", BPFFS.encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise BPFUnavailableError(f"bpffs is not mounted at {BPFFS} and mounting it failed: {os.strerror(err)}")
