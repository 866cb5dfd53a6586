"""TCX links (Linux 6.6+): bwplugin's counting programs at the head of a veth's
TCX hooks, each held by a BPF link pinned in bpffs so that it outlives the
plugin process, and removed by DEL and GC through that pin.

TCX programs all run before any clsact filter; ours is attached in front of
every other (BPF_F_BEFORE with no relative program), counts and classifies,
and passes the packet on (TCX_NEXT). A pin is named by the attachment's owner
hash (network, container, ifname): DEL finds it even when the map entry, the
veth or the netns is gone."""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from . import bpf

HOOKS = {"ingress": bpf.BPF_TCX_INGRESS, "egress": bpf.BPF_TCX_EGRESS}
PROGRAM = {"ingress": "bwp_tcx_from_pod", "egress": "bwp_tcx_to_pod"}  # the veth's ingress: what the pod sends
PIN_PREFIX = "tcx_link_"


def pin_path(owner: int, hook: str) -> Path:
    return bpf.pin_dir() / f"{PIN_PREFIX}{owner:016x}_{hook}"


def attach(progs: bpf.Programs, ifindex: int, owner: int, hook: str) -> None:
    """Create the link at the head of the hook and pin it; a stale pin of this
    owner (an ADD killed before its DEL) is released first."""
    path = pin_path(owner, hook)
    release([fd for fd in [_unpin(path)] if fd is not None])
    fd = bpf.link_create(progs.fd(PROGRAM[hook]), ifindex, HOOKS[hook], bpf.BPF_F_BEFORE)
    try:
        bpf.obj_pin(fd, path)
    finally:
        os.close(fd)  # the pin holds the link now


def detach(owner: int) -> int:
    """Detach and unpin the owner's links, also defunct ones (veth gone); returns
    how many pins there were."""
    fds = unpin(owner)
    release(fds)
    return len(fds)


def unpin(owner: int) -> list[int]:
    """Remove the owner's pins and return fds that still hold the links: cheap.
    Detaching is what costs (the kernel waits for an RCU grace period under the
    rtnl lock, ~15 ms here), so the agent does it after DEL has answered; the
    links are inert already once the attachment's map entries are gone."""
    fds: list[int] = []
    try:
        for hook in HOOKS:
            fd = _unpin(pin_path(owner, hook))
            if fd is not None:
                fds.append(fd)
    except OSError:
        release(fds)
        raise
    return fds


def _unpin(path: Path) -> int | None:
    """An fd holding the pinned link, its pin removed; None if there was no pin."""
    try:
        fd = bpf.obj_get(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return fd


def release(fds: list[int]) -> None:
    """Detach and close links held by fds (from unpin)."""
    for fd in fds:
        try:
            # explicit: closing alone leaves the program running while any other
            # process (bpftool, say) holds an fd to the link
            with contextlib.suppress(OSError):  # a defunct link: already detached
                bpf.link_detach(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Pinned:
    hook: str
    path: Path
    info: bpf.LinkInfo | None  # None: the pin is not a link we can read


def pinned(owner: int) -> dict[str, Pinned]:
    """The owner's pinned links, by hook."""
    out = {}
    for hook in HOOKS:
        path = pin_path(owner, hook)
        try:
            fd = bpf.obj_get(path)
        except OSError:
            continue
        try:
            info: bpf.LinkInfo | None = bpf.link_info(fd)
        except OSError:
            info = None
        finally:
            os.close(fd)
        out[hook] = Pinned(hook, path, info)
    return out


def chain(ifindex: int, hook: str) -> list[int]:
    """Program ids on a TCX hook of the device, in the order they run."""
    try:
        return bpf.prog_query(ifindex, HOOKS[hook])
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
            return []
        raise


def owners_pinned() -> set[int]:
    """Owner hashes that have link pins (for GC and the leak checks)."""
    out = set()
    with contextlib.suppress(OSError):
        for p in bpf.pin_dir().iterdir():
            if p.name.startswith(PIN_PREFIX):
                with contextlib.suppress(ValueError):
                    out.add(int(p.name[len(PIN_PREFIX) :].split("_", 1)[0], 16))
    return out
