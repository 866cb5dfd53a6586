"""What this kernel can do, found by trying it in a throwaway network namespace.

Each probe runs in a thread that unshare()s a fresh, unnamed netns: everything it
creates there (devices, qdiscs, filters) disappears with the thread, even if we
are killed, and nothing on the node is touched. Kinds are tried rather than
looked up because modules may be built in, loadable, or missing."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..cni import settings
from ..cni.config import Direction, Policy
from ..cni.errors import KernelFeatureError
from . import bpf, tc
from .netlink import CLONE_NEWNET, Netlink, NetlinkError, in_helper_thread, libc
from .shaping import tbf_params

T = TypeVar("T")
PROBE_IFB = "bwplprobe0"  # only ever exists inside the probe's own netns


def in_fresh_netns(fn: Callable[[Netlink], T]) -> T:
    """Run fn(netlink) in a new, unnamed netns that dies with the helper thread."""

    def run() -> T:
        if libc().unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        with Netlink() as nl:
            lo = nl.link(name="lo")
            assert lo is not None
            nl.set_link(lo.index, up=True)
            return fn(nl)

    return in_helper_thread(run, "bwplugin-probe")


# ---------------------------------------------------------------- kinds

_PARAMS = tbf_params(Direction(rate=10_000_000, burst=80_000), Policy())


def _try_qdisc(kind: str) -> Callable[[Netlink, int], None]:
    def add(nl: Netlink, index: int) -> None:
        if kind == "tbf":
            tc.add_tbf(nl, index, _PARAMS)
        elif kind == "htb":
            tc.add_htb(nl, index, _PARAMS, default_shaped=True, mtu=1500)  # also needs bfifo
        elif kind == "clsact":
            tc.add_clsact(nl, index)
            return
        else:
            tc.add_root_qdisc(nl, index, kind)
        tc.delete_qdisc(nl, index, tc.TC_H_ROOT, tc.ROOT_HANDLE)

    return add


def _clsact_ready(nl: Netlink, index: int) -> bool:
    """A clsact to hang probe filters on (the kinds loop may have left one)."""
    if tc.clsact_qdisc(nl, index) is not None:
        return True
    try:
        tc.add_clsact(nl, index)
    except KernelFeatureError:
        return False
    return True


def missing_kinds(kinds: tuple[str, ...] = ("tbf", "htb", "clsact"), progs: bpf.Programs | None = None) -> list[str]:
    """The kinds this kernel cannot create, each with the module that would provide
    it. With programs, also cls_bpf in both modes and act_mirred."""

    def run(nl: Netlink) -> list[str]:
        missing: list[str] = []
        lo = nl.link(name="lo")
        assert lo is not None
        for kind in kinds:
            try:
                _try_qdisc(kind)(nl, lo.index)
            except KernelFeatureError:
                missing.append(f"qdisc {kind} ({tc.module_of(kind)})")
        try:
            nl.create_link(PROBE_IFB, "ifb")
        except NetlinkError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            missing.append("device ifb (ifb)")
        if progs is not None and _clsact_ready(nl, lo.index):
            try:
                tc.add_bpf_filter(nl, lo.index, tc.CLSACT_EGRESS, progs.fd("bwp_to_pod"), "bwplugin:probe", 0)
            except KernelFeatureError:
                missing.append("classifier bpf (cls_bpf)")
            else:
                try:
                    fd = progs.fd("bwp_from_pod_mirred")
                    tc.add_bpf_filter(nl, lo.index, tc.CLSACT_INGRESS, fd, "bwplugin:probe", 0, mirred_to=lo.index)
                except (KernelFeatureError, NetlinkError):
                    missing.append("action mirred (act_mirred)")
        return missing

    return in_fresh_netns(run)


# ---------------------------------------------------------------- redirect


def redirect_honoured(progs: bpf.Programs, program: str = "bwp_from_pod") -> bool:
    """Does an ifb accept packets that bwp_from_pod bpf_redirect()s into it from tc
    ingress? (Linux >= 6.4; before, ifb drops them as not "redirected".) Sends
    one frame across a veth pair into the real program and watches the ifb.
    (`program` exists for the tests' negative control.)"""

    def run(nl: Netlink) -> bool:
        nl.create_veth("bwplprobe1", "bwplprobe2")
        nl.create_link(PROBE_IFB, "ifb")
        links = {n: nl.link(name=n) for n in ("bwplprobe1", "bwplprobe2", PROBE_IFB)}
        for link in links.values():
            assert link is not None
            nl.silence_ipv6(link.index)  # only the probe's frame may reach the ifb
            nl.set_link(link.index, up=True)
        src, dst, ifb = links["bwplprobe1"], links["bwplprobe2"], links[PROBE_IFB]
        assert src and dst and ifb
        # key 0 is never an attachment (ids start at 1): the probe's filter has classid 0
        entry = bpf.AttachEntry(ifb.index, dst.index, 0, 0, 0, "probe", "probe")
        bpf.map_update(progs.map_fd, bpf.attach_key(0), entry.pack())
        try:
            tc.add_clsact(nl, dst.index)
            tc.add_bpf_filter(nl, dst.index, tc.CLSACT_INGRESS, progs.fd(program), "bwplugin:probe", 0)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind(("bwplprobe1", 0))
                frame = b"\xff" * 6 + bytes.fromhex("02b0d0000001") + b"\x88\xb5" + b"bwplugin probe".ljust(46, b"\0")
                for _ in range(3):
                    sock.send(frame)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                now = nl.link(index=ifb.index)
                if now is not None and now.tx_packets > 0:
                    return True
                time.sleep(0.01)
            return False
        finally:
            bpf.map_delete(progs.map_fd, bpf.attach_key(0))

    return in_fresh_netns(run)


def missing_kinds_cached(kinds: tuple[str, ...], progs: bpf.Programs | None) -> list[str]:
    """missing_kinds, probed once per boot, kernel, kind list and program version:
    runtimes poll STATUS, and a probe builds a throwaway netns each time."""
    key = f"{os.uname().release} {_boot_id()} {','.join(kinds)} {progs.version if progs else '-'}"
    run_dir = Path(settings.get("BWPLUGIN_RUN_DIR") or "/run/bwplugin")
    cache = run_dir / f"kinds.{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and isinstance(cached.get("missing"), list):
            return [str(m) for m in cached["missing"]]
    except (OSError, ValueError, AttributeError):
        pass  # not probed yet (or a torn file): probe
    missing = missing_kinds(kinds, progs)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "missing": missing}))
    os.replace(tmp, cache)
    return missing


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cached_mode(cache: Path, key: str) -> str | None:
    try:
        cached_key, _, mode = cache.read_text().rpartition(" ")
    except OSError:
        return None
    return mode if cached_key == key and mode in ("bpf", "mirred") else None


def redirect_mode(progs: bpf.Programs, requested: str) -> str:
    """ "bpf" or "mirred". "auto" probes once per boot and program version (under
    the node lock, so concurrent ADDs probe once) and remembers the answer."""
    if requested != "auto":
        return requested
    run_dir = Path(settings.get("BWPLUGIN_RUN_DIR") or "/run/bwplugin")
    cache = run_dir / f"redirect.{progs.version}"
    key = f"{os.uname().release} {_boot_id()}"
    cached = _cached_mode(cache, key)  # the common case: no lock needed to read it
    if cached:
        return cached
    with bpf.node_lock():
        cached = _cached_mode(cache, key)
        if cached:
            return cached
        mode = "bpf" if redirect_honoured(progs) else "mirred"
        settings.log(f"eBPF redirect into ifb {'works' if mode == 'bpf' else 'is not honoured'}: using {mode}")
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(f"{key} {mode}")
        os.replace(tmp, cache)
        return mode
