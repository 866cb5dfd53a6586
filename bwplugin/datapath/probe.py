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
            return _frames_seen(nl, ifb.index, 1)
        finally:
            bpf.map_delete(progs.map_fd, bpf.attach_key(0))

    return in_fresh_netns(run)


PROBE_FRAMES = 3
PROBE_WAIT = 2.0  # s: a negative answer (an old kernel) costs this once per boot
PROBE_RESEND = 0.05  # s


def _frames_seen(nl: Netlink, index: int, want: int) -> bool:
    """Send frames out of bwplprobe1 until `index` has transmitted `want` of them,
    for up to PROBE_WAIT. (A local experimental ethertype: nothing else answers it.)
    They are sent again and again, not once: a veth gets its qdisc only when the
    kernel's linkwatch work sees its carrier, later and on a busy node much later
    than "up" returns, and frames sent before that are dropped without a word."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("bwplprobe1", 0))
        frame = b"\xff" * 6 + bytes.fromhex("02b0d0000001") + b"\x88\xb5" + b"bwplugin probe".ljust(46, b"\0")
        deadline = time.monotonic() + PROBE_WAIT
        while True:
            for _ in range(PROBE_FRAMES):
                sock.send(frame)
            resend = time.monotonic() + PROBE_RESEND
            while time.monotonic() < resend:
                now = nl.link(index=index)
                if now is not None and now.tx_packets >= want:
                    return True
                time.sleep(0.005)
            if time.monotonic() > deadline:
                return False


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


def _cached_mode(cache: Path, key: str, modes: tuple[str, ...]) -> str | None:
    try:
        cached_key, _, mode = cache.read_text().rpartition(" ")
    except OSError:
        return None
    return mode if cached_key == key and mode in modes else None


def _once_per_boot(what: str, progs: bpf.Programs, modes: tuple[str, str], works: Callable[[], bool]) -> str:
    """modes[0] if `works` says so, else modes[1]: probed once per boot and program
    version (under the node lock, so concurrent ADDs probe once), then remembered."""
    run_dir = Path(settings.get("BWPLUGIN_RUN_DIR") or "/run/bwplugin")
    cache = run_dir / f"{what}.{progs.version}"
    key = f"{os.uname().release} {_boot_id()}"
    cached = _cached_mode(cache, key, modes)  # the common case: no lock needed to read it
    if cached:
        return cached
    with bpf.node_lock():
        cached = _cached_mode(cache, key, modes)
        if cached:
            return cached
        # frames seen prove the feature; none seen may be a stall: ask once more
        mode = modes[0] if works() or works() else modes[1]
        settings.log(f"probe {what}: using {mode}")
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(f"{key} {mode}")
        os.replace(tmp, cache)
        return mode


def redirect_mode(progs: bpf.Programs, requested: str) -> str:
    """ "bpf" or "mirred". "auto": does an ifb honour bpf_redirect (probed once per boot)?"""
    if requested != "auto":
        return requested
    return _once_per_boot("redirect", progs, ("bpf", "mirred"), lambda: redirect_honoured(progs))


def attach_mode(progs: bpf.Programs, requested: str) -> str:
    """ "tcx" or "tc" (cls_bpf counting filters). "auto": do TCX links attach and
    pass packets on (probed once per boot)?"""
    if requested != "auto":
        return requested
    return _once_per_boot("tcx", progs, ("tcx", "tc"), lambda: tcx_passes_on(progs))


# ---------------------------------------------------------------- TCX


def tcx_passes_on(progs: bpf.Programs) -> bool:
    """Does a TCX link attach (Linux 6.6+, CONFIG_NET_XGRESS), and does a frame
    its program passes on (TCX_NEXT) leave the device? Sends frames out of a
    veth whose egress hook runs the real bwp_tcx_to_pod."""

    def run(nl: Netlink) -> bool:
        nl.create_veth("bwplprobe1", "bwplprobe2")
        links = [nl.link(name=n) for n in ("bwplprobe1", "bwplprobe2")]
        for link in links:
            assert link is not None
            nl.silence_ipv6(link.index)  # only the probe's frames leave
            nl.set_link(link.index, up=True)
        src = links[0]
        assert src is not None
        try:
            fd = bpf.link_create(progs.fd("bwp_tcx_to_pod"), src.index, bpf.BPF_TCX_EGRESS, bpf.BPF_F_BEFORE)
        except OSError as exc:
            settings.log(f"TCX links do not attach here ({exc.strerror}): counting with cls_bpf filters")
            return False
        try:
            return _frames_seen(nl, src.index, PROBE_FRAMES)
        finally:
            os.close(fd)  # unpinned: closing it detaches the program

    return in_fresh_netns(run)
