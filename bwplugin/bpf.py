"""The eBPF side: raw bpf(2) syscalls, bpffs pins, and the once-per-node compile.

bcc is imported only to compile (first ADD on a node, or after an upgrade); every
other ADD/DEL/CHECK reuses the pinned program and map through plain syscalls."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .errors import BPFUnavailableError

SYS_BPF = 321  # x86_64
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 6, 7, 15
BPF_NOEXIST = 1

BPFFS = "/sys/fs/bpf"
MAP_LAYOUT = 2  # bump when bwp_key/bwp_val change; the map pin is versioned by it
MAX_ATTACH = 65535  # ids are 16-bit: skb->tc_classid is a u16 (qdisc_skb_cb)
PROG_NAME = "bwp_egress"

KEY = struct.Struct("=I")  # attachment id (the filter's classid)
VAL = struct.Struct("=IIQQ")  # struct bwp_val


def pin_dir() -> Path:
    return Path(settings.get("BWPLUGIN_PIN_DIR") or f"{BPFFS}/bwplugin")


def source_path() -> Path:
    default = Path(__file__).resolve().parent.parent / "bpf"
    return Path(settings.get("BWPLUGIN_BPF_DIR") or default) / "bwp_egress.c"


def lock_path() -> Path:
    return Path(settings.get("BWPLUGIN_RUN_DIR") or "/run/bwplugin") / "bpf.lock"


# ---------------------------------------------------------------- syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(attr, 128)
    ret = _libc.syscall(SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret, buf.raw


def obj_get(path: str | Path) -> int:
    p = ctypes.create_string_buffer(str(path).encode())
    return _bpf(BPF_OBJ_GET, struct.pack("=QII", ctypes.addressof(p), 0, 0))[0]


def obj_pin(fd: int, path: str | Path) -> None:
    p = ctypes.create_string_buffer(str(path).encode())
    _bpf(BPF_OBJ_PIN, struct.pack("=QII", ctypes.addressof(p), fd, 0))


def obj_id(fd: int) -> int:
    """The kernel id of a prog or map fd (bpf_{prog,map}_info.id at offset 4)."""
    info = ctypes.create_string_buffer(256)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 256, ctypes.addressof(info)))
    return int(struct.unpack_from("=I", info.raw, 4)[0])


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key)
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k), ctypes.addressof(v), 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
    _bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k), ctypes.addressof(v), flags))


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key)
    try:
        _bpf(BPF_MAP_DELETE_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k), 0, 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    prev = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        cur = ctypes.create_string_buffer(prev) if prev is not None else None
        attr = struct.pack("=IxxxxQQ", fd, ctypes.addressof(cur) if cur else 0, ctypes.addressof(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        prev = nxt.raw
        keys.append(prev)


# ---------------------------------------------------------------- attach map


@dataclass(frozen=True)
class AttachEntry:
    ifb_index: int
    host_index: int
    packets: int
    bytes: int


def attach_key(attach_id: int) -> bytes:
    return KEY.pack(attach_id)


def attach_new(map_fd: int, ifb_index: int, host_index: int) -> int:
    """Insert an entry under a fresh random id. BPF_NOEXIST makes the insert the
    allocation: two concurrent ADDs can never get the same id, and no lock is needed."""
    value = VAL.pack(ifb_index, host_index, 0, 0)
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


def attach_get(map_fd: int, attach_id: int) -> AttachEntry | None:
    raw = map_lookup(map_fd, attach_key(attach_id), VAL.size)
    if raw is None:
        return None
    return AttachEntry(*VAL.unpack_from(raw))


def attach_entries(map_fd: int) -> dict[int, AttachEntry]:
    out = {}
    for key in map_keys(map_fd, KEY.size):
        entry = attach_get(map_fd, KEY.unpack(key)[0])
        if entry is not None:
            out[KEY.unpack(key)[0]] = entry
    return out


# ---------------------------------------------------------------- program


@dataclass
class Program:
    """The pinned egress program and its attach map, opened by fd."""

    prog_fd: int
    map_fd: int
    prog_path: Path
    map_path: Path

    @property
    def prog_id(self) -> int:
        return obj_id(self.prog_fd)

    @property
    def filter_name(self) -> str:
        # cls_bpf keeps this name; it ties an attached filter to the pin it came from
        return f"bwplugin:{self.prog_path.name}"

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def map_path() -> Path:
    return pin_dir() / f"attach_v{MAP_LAYOUT}"


_DIGESTS: dict[tuple[Path, float], str] = {}


def prog_path() -> Path:
    """Versioned by the C source and map layout: a changed program gets a new pin."""
    src = source_path()
    try:
        key = (src, src.stat().st_mtime)
        if key not in _DIGESTS:
            _DIGESTS[key] = hashlib.sha256(src.read_bytes() + f"layout={MAP_LAYOUT}".encode()).hexdigest()[:12]
    except OSError as exc:
        raise BPFUnavailableError(f"eBPF source {src} cannot be read: {exc.strerror}") from exc
    return pin_dir() / f"egress_{_DIGESTS[key]}"


def open_pinned() -> Program | None:
    pp, mp = prog_path(), map_path()
    try:
        prog_fd = obj_get(pp)
    except OSError:
        return None
    try:
        map_fd = obj_get(mp)
    except OSError:
        os.close(prog_fd)
        return None
    return Program(prog_fd, map_fd, pp, mp)


def open_map() -> int | None:
    """The attach map alone (DEL and GC need no program)."""
    try:
        return obj_get(map_path())
    except OSError:
        return None


def egress_program() -> Program:
    """The pinned program, compiling and pinning it first if this node has none."""
    prog = open_pinned()
    if prog is not None:
        return prog
    ensure_bpffs()
    lock = lock_path()
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel if we die
        prog = open_pinned()  # somebody else may have compiled while we waited
        if prog is None:
            prog = _compile_and_pin()
    return prog


def _compile_and_pin() -> Program:
    pin_dir().mkdir(parents=True, exist_ok=True)
    pp, mp = prog_path(), map_path()
    try:
        from bcc import BPF  # heavy (LLVM); only here
    except ImportError as exc:
        raise BPFUnavailableError("bcc (python3-bpfcc) is not importable, and no compiled program is pinned") from exc
    cflags = [f'-DBWP_MAP_PIN="{mp}"', f"-DBWP_MAX_ATTACH={MAX_ATTACH}", "-w"]
    with _stderr_to_tempfile() as log:
        try:
            bcc = BPF(src_file=str(source_path()).encode(), cflags=cflags)
            fn = bcc.load_func(PROG_NAME.encode(), BPF.SCHED_CLS)
        except Exception as exc:
            raise BPFUnavailableError(f"compiling {source_path()} failed: {exc}", log.read()) from exc
    prog_fd = os.dup(fn.fd)
    obj_pin(prog_fd, pp)
    _unpin_old_programs(keep=pp)
    bcc.cleanup()
    return Program(prog_fd, obj_get(mp), pp, mp)


def _unpin_old_programs(keep: Path) -> None:
    """Older versions' pins; filters that run them keep them alive until DEL."""
    for old in pin_dir().glob("egress_*"):
        if old != keep:
            with contextlib.suppress(OSError):
                old.unlink()


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
