"""ADD, DEL, CHECK, GC and STATUS: what bwplugin does to the kernel, per command."""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bpf, settings, tc
from .config import Direction, Env, NetConf, Policy
from .errors import (
    BPFUnavailableError,
    CheckMismatchError,
    ForeignObjectError,
    HostInterfaceError,
    IncompatibleVersionError,
    InvalidConfigError,
    InvalidEnvError,
    IOFailureError,
    NotAvailableError,
)
from .naming import IFB_PREFIX, IfbLabel, format_alias, ifb_name, network_tag, parse_alias
from .netlink import Link, Netlink, TcObject
from .protocol import convert_result, host_interface_names, version_at_least, with_interface
from .settings import log
from .shaping import TBFParams, tbf_params

# ---------------------------------------------------------------- helpers


def fault(point: str) -> None:
    """Test hook: BWPLUGIN_FAULT=<point>[:kill] fails (or SIGKILLs) ADD at a step."""
    spec = settings.get("BWPLUGIN_FAULT") or ""
    name, _, action = spec.partition(":")
    if name == point:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise IOFailureError(f"injected fault at {point}")


class Undo:
    """Rollback stack: on failure, undo what this ADD created, newest first."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], object]] = []

    def push(self, step: Callable[[], object]) -> None:
        self.steps.append(step)

    def rollback(self) -> None:
        for step in reversed(self.steps):
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                log(f"rollback step failed: {exc}")
        self.steps.clear()


@dataclass(frozen=True)
class HostVeth:
    index: int
    name: str
    mtu: int


def open_netns(path: str) -> Netlink:
    try:
        return Netlink.in_netns(path)
    except FileNotFoundError as exc:
        raise InvalidEnvError(f"CNI_NETNS={path!r} does not exist") from exc
    except OSError as exc:
        raise InvalidEnvError(f"CNI_NETNS={path!r} cannot be entered: {exc.strerror}") from exc


def find_host_veth(nl: Netlink, env: Env, result: dict[str, Any] | None) -> HostVeth:
    """The host end of the pod's veth: peer ifindex read inside the netns, checked
    against the host link's own peer and against prevResult's host interfaces."""
    with open_netns(env.netns) as pod:
        link = pod.link(name=env.ifname)
    if link is None:
        raise HostInterfaceError(f"interface {env.ifname!r} not found in netns {env.netns}")
    if link.kind != "veth" or not link.peer_index:
        raise HostInterfaceError(
            f"interface {env.ifname!r} in netns {env.netns} is a {link.kind or 'device'} "
            "without a peer, not a veth: bwplugin shapes veth-based pods only"
        )
    host = nl.link(index=link.peer_index)
    if host is None or host.kind != "veth" or host.peer_index != link.index:
        raise HostInterfaceError(
            f"the host-side peer of {env.ifname!r} (ifindex {link.peer_index}) is not in this network namespace"
        )
    names = host_interface_names(result) if result else []
    if names and host.name not in names:
        raise HostInterfaceError(
            f"host veth {host.name!r} of {env.ifname!r} is not among prevResult's host interfaces {names}"
        )
    return HostVeth(host.index, host.name, host.mtu or 1500)


def _ensure_no_foreign_qdiscs(nl: Netlink, host: HostVeth) -> None:
    root = tc.root_qdisc(nl, host.index)
    if root is not None and root.kind != "noqueue":
        raise ForeignObjectError(
            f"host veth {host.name} already has a root qdisc {root.kind} {root.handle >> 16:x}: "
            "bwplugin does not replace qdiscs it did not create"
        )
    ingress = tc.clsact_qdisc(nl, host.index)
    if ingress is not None:
        raise ForeignObjectError(
            f"host veth {host.name} already has a {ingress.kind} qdisc: bwplugin does not share "
            "or replace ingress qdiscs it did not create"
        )


def _report_policy(what: str, d: Direction, p: TBFParams, policy: Policy) -> None:
    if p.burst_capped:
        log(f"{what} burst {p.requested_burst} B capped to {p.burst} B (maxBurstMs={policy.max_burst_ms:g})")
    if p.burst_raised:
        log(f"{what} burst {p.requested_burst} B raised to the floor of {p.burst} B")


# ---------------------------------------------------------------- ADD


def cmd_add(env: Env, conf: NetConf) -> dict[str, Any]:
    if conf.prev_result is None:
        raise InvalidConfigError(
            "prevResult is required: bwplugin is a chained plugin and must follow a main plugin "
            "(ptp, bridge, ...) in a conflist"
        )
    result = convert_result(conf.prev_result, conf.cni_version)
    bw = conf.bandwidth
    if not bw.shaped:
        return result
    undo = Undo()
    with Netlink() as nl:
        try:
            host = find_host_veth(nl, env, result)
            _ensure_no_foreign_qdiscs(nl, host)
            if bw.ingress:
                params = tbf_params(bw.ingress, conf.policy, host.mtu)
                _report_policy("ingress", bw.ingress, params, conf.policy)
                tc.add_tbf(nl, host.index, params)
                undo.push(lambda: tc.delete_qdisc(nl, host.index, tc.TC_H_ROOT, tc.TBF_HANDLE))
                fault("after-ingress")
            if bw.egress:
                ifb = _add_egress(nl, env, conf, host, bw.egress, undo)
                result = with_interface(result, ifb.name, ifb.mac)
        except BaseException:
            undo.rollback()
            raise
    return result


def _add_egress(nl: Netlink, env: Env, conf: NetConf, host: HostVeth, d: Direction, undo: Undo) -> Link:
    prog = bpf.egress_program()
    undo.push(prog.close)
    name = ifb_name(conf.name, env.container_id, env.ifname)
    _remove_stale_ifb(nl, name)
    nl.create_link(name, "ifb", mtu=host.mtu)
    ifb = nl.link(name=name)
    assert ifb is not None
    undo.push(lambda: nl.delete_link(ifb.index))
    fault("after-ifb")
    attach_id = bpf.attach_new(prog.map_fd, ifb.index, host.index)
    undo.push(lambda: bpf.map_delete(prog.map_fd, bpf.attach_key(attach_id)))
    label = IfbLabel(network_tag(conf.name), attach_id, host.index, env.ifname, env.container_id)
    nl.set_link(ifb.index, up=True, alias=format_alias(label))
    params = tbf_params(d, conf.policy, host.mtu)
    _report_policy("egress", d, params, conf.policy)
    tc.add_tbf(nl, ifb.index, params)
    fault("after-map")
    tc.add_clsact(nl, host.index)
    undo.push(lambda: tc.delete_qdisc(nl, host.index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE))
    fault("after-clsact")
    tc.add_bpf_filter(nl, host.index, prog.prog_fd, prog.filter_name, attach_id)
    fault("after-filter")
    return ifb


def _remove_stale_ifb(nl: Netlink, name: str) -> None:
    """Our name exists only if an earlier ADD died before its DEL: replace it."""
    old = nl.link(name=name)
    if old is None:
        return
    # an ifb with exactly this attachment's hashed name is ours even without its alias
    # (an ADD killed between creating it and labelling it); anything else is not
    if old.kind != "ifb":
        raise ForeignObjectError(f"a {old.kind or 'device'} named {name} exists and was not created by bwplugin")
    log(f"removing stale ifb {name} left by an earlier ADD")
    nl.delete_link(old.index)


# ---------------------------------------------------------------- DEL

# Set by the agent: hands an inert ifb to a background thread, because deleting a
# netdev waits for RCU (15-30 ms) and nothing about the pod depends on it any more.
ifb_releaser: Callable[[Link], None] | None = None


def cmd_del(env: Env, conf: NetConf) -> None:
    """Best effort and idempotent: remove whatever of ours is still there."""
    name = ifb_name(conf.name, env.container_id, env.ifname)
    with Netlink() as nl:
        ifb = nl.link(name=name)
        label = parse_alias(ifb.alias) if ifb else None
        if ifb is not None and ifb.kind != "ifb":
            ifb = None  # a foreign device with our name: not ours to delete
        host_index = _del_host_index(nl, env, conf, label)
        attach_id = label.attach_id if label else None
        if host_index is not None:
            found = teardown_host(nl, host_index)
            attach_id = attach_id or found
        if attach_id:
            release_attach_id(nl, attach_id, ifb)
        if ifb is not None:
            if ifb_releaser is not None:
                ifb_releaser(ifb)  # already inert: no filter, no map entry points at it
            else:
                nl.delete_link(ifb.index)


def _del_host_index(nl: Netlink, env: Env, conf: NetConf, label: IfbLabel | None) -> int | None:
    if env.netns and os.path.exists(env.netns):
        try:
            return find_host_veth(nl, env, conf.prev_result).index
        except (HostInterfaceError, InvalidEnvError, InvalidConfigError, OSError):
            pass  # the pod side is half gone; fall back to what the ifb recorded
    return label.host_index if label else None


def teardown_host(nl: Netlink, host_index: int) -> int | None:
    """Remove our TBF and our clsact (recognised by handle and by our filter) from a
    veth. Returns the attachment id our filter carried, if there was one."""
    host = nl.link(index=host_index)
    if host is None or host.kind != "veth":
        return None
    if tc.is_our_tbf(tc.root_qdisc(nl, host_index)):
        tc.delete_qdisc(nl, host_index, tc.TC_H_ROOT, tc.TBF_HANDLE)
    ours = tc.our_filter(nl, host_index)
    clsact = tc.clsact_qdisc(nl, host_index)
    if ours is not None and clsact is not None and clsact.kind == "clsact":
        tc.delete_qdisc(nl, host_index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE)
    return ours.classid if ours else None


def release_attach_id(nl: Netlink, attach_id: int, ifb: Link | None) -> None:
    """Delete the map entry, unless it now belongs to a live attachment (ids are
    random, so only a stale DEL could meet a reused one)."""
    map_fd = bpf.open_map()
    if map_fd is None:
        return
    try:
        entry = bpf.attach_get(map_fd, attach_id)
        if entry is None:
            return
        if ifb is not None and entry.ifb_index != ifb.index:
            return
        if ifb is None and _is_live_ifb(nl, entry.ifb_index, attach_id):
            return
        bpf.map_delete(map_fd, bpf.attach_key(attach_id))
    finally:
        os.close(map_fd)


def _is_live_ifb(nl: Netlink, index: int, attach_id: int) -> bool:
    link = nl.link(index=index)
    label = parse_alias(link.alias) if link else None
    return label is not None and label.attach_id == attach_id


# ---------------------------------------------------------------- CHECK


def cmd_check(env: Env, conf: NetConf) -> None:
    if not version_at_least(conf.cni_version, "0.4.0"):
        raise IncompatibleVersionError(f"CHECK is not supported for cniVersion {conf.cni_version} (needs 0.4.0+)")
    if conf.prev_result is None:
        raise InvalidConfigError("prevResult is required for CHECK")
    bw = conf.bandwidth
    problems: list[str] = []
    with Netlink() as nl:
        host = find_host_veth(nl, env, conf.prev_result)
        root = tc.root_qdisc(nl, host.index)
        if bw.ingress:
            _check_tbf(problems, f"ingress TBF on {host.name}", root, tbf_params(bw.ingress, conf.policy, host.mtu))
        elif tc.is_our_tbf(root):
            problems.append(f"ingress TBF on {host.name}: present but no ingress rate is configured")
        name = ifb_name(conf.name, env.container_id, env.ifname)
        if bw.egress:
            _check_egress(nl, problems, host, name, tbf_params(bw.egress, conf.policy, host.mtu))
        elif nl.link(name=name) is not None:
            problems.append(f"ifb {name}: present but no egress rate is configured")
    if problems:
        raise CheckMismatchError("shaping state does not match the config: " + "; ".join(problems))


def _check_tbf(problems: list[str], what: str, q: TcObject | None, want: TBFParams) -> None:
    if q is None or not tc.is_our_tbf(q):
        kind = q.kind if q is not None else "none"
        problems.append(f"{what}: expected bwplugin's tbf b0d0:, found {kind}")
        return
    got = tc.tbf_state(q)
    if got is None:
        problems.append(f"{what}: cannot read its parameters")
        return
    for field, expected, actual in (
        ("rate", want.rate, got.rate),
        ("limit", want.limit, got.limit),
        ("buffer", want.buffer_ticks, got.buffer_ticks),
    ):
        # the kernel stores the bucket as a time and reports it rounded: allow 0.1 %
        tolerance = max(2, expected // 1000) if field == "buffer" else 0
        if abs(expected - actual) > tolerance:
            problems.append(f"{what}: {field} expected {expected}, actual {actual}")


def _check_egress(nl: Netlink, problems: list[str], host: HostVeth, name: str, want: TBFParams) -> None:
    ifb = nl.link(name=name)
    if ifb is None or ifb.kind != "ifb":
        problems.append(f"ifb {name}: missing")
    else:
        if not ifb.up:
            problems.append(f"ifb {name}: down")
        _check_tbf(problems, f"egress TBF on {name}", tc.root_qdisc(nl, ifb.index), want)
    if tc.clsact_qdisc(nl, host.index) is None:
        problems.append(f"clsact on {host.name}: missing")
    prog = bpf.open_pinned()
    if prog is None:
        problems.append(f"eBPF program: not pinned at {bpf.prog_path()}")
        return
    try:
        flt = tc.our_filter(nl, host.index)
        if flt is None:
            problems.append(f"bpf filter on {host.name}: missing")
            return
        if flt.prog_id != prog.prog_id or not flt.direct_action:
            problems.append(
                f"bpf filter on {host.name}: runs prog id {flt.prog_id} (direct-action={flt.direct_action}), "
                f"expected {prog.prog_id} (direct-action=True)"
            )
        entry = bpf.attach_get(prog.map_fd, flt.classid)
        if entry is None:
            problems.append(f"attach map entry {flt.classid} for {host.name}: missing")
        elif ifb is not None and entry.ifb_index != ifb.index:
            problems.append(
                f"attach map entry {flt.classid} for {host.name}: points at ifindex {entry.ifb_index}, "
                f"expected {ifb.index}"
            )
    finally:
        prog.close()


# ---------------------------------------------------------------- GC and STATUS


def cmd_gc(conf: NetConf) -> None:
    """Remove this network's attachments that are not in cni.dev/valid-attachments."""
    if conf.valid_attachments is None:
        return  # nothing tells us what is valid: removing everything would be wrong
    keep = {ifb_name(conf.name, a.container_id, a.ifname) for a in conf.valid_attachments}
    tag = network_tag(conf.name)
    failures: list[str] = []
    with Netlink() as nl:
        for link in nl.links():
            label = parse_alias(link.alias)
            if not link.name.startswith(IFB_PREFIX) or link.kind != "ifb" or label is None:
                continue
            if label.network_tag != tag or link.name in keep:
                continue
            try:
                teardown_host(nl, label.host_index)
                release_attach_id(nl, label.attach_id, link)
                nl.delete_link(link.index)
            except OSError as exc:
                failures.append(f"{link.name} ({label.container_id}/{label.ifname}): {exc}")
    if failures:
        raise IOFailureError(f"GC could not remove {len(failures)} stale attachment(s)", "; ".join(failures))


def delete_ifb_if_same(nl: Netlink, old: Link) -> bool:
    """Delete an ifb by index only if it is still the device we were given."""
    now = nl.link(index=old.index)
    if now is None or now.name != old.name or now.alias != old.alias:
        return False
    return nl.delete_link(old.index)


def orphan_ifbs(nl: Netlink) -> list[Link]:
    """Our ifbs whose attachment id no longer maps to them: left by a DEL whose
    deferred release never ran (the agent died). Nothing can redirect to them."""
    map_fd = bpf.open_map()
    try:
        out = []
        for link in nl.links():
            label = parse_alias(link.alias)
            if link.kind != "ifb" or label is None or not link.name.startswith(IFB_PREFIX):
                continue
            entry = bpf.attach_get(map_fd, label.attach_id) if map_fd is not None else None
            if entry is None or entry.ifb_index != link.index:
                out.append(link)
        return out
    finally:
        if map_fd is not None:
            os.close(map_fd)


def status_problems() -> list[str]:
    problems = []
    if not os.path.ismount(bpf.BPFFS):
        try:
            bpf.ensure_bpffs()
        except BPFUnavailableError as exc:
            problems.append(exc.msg)
    if bpf.open_map() is None or not Path(bpf.prog_path()).exists():
        # first ADD will compile: it needs bcc and kernel headers
        if importlib.util.find_spec("bcc") is None:
            problems.append("bcc (python3-bpfcc) is not installed and no compiled program is pinned")
        build = Path(f"/lib/modules/{os.uname().release}/build")
        if not build.exists():
            problems.append(f"kernel headers are missing ({build}) and no compiled program is pinned")
    return problems


def cmd_status() -> None:
    problems = status_problems()
    if problems:
        raise NotAvailableError("bwplugin cannot shape pods on this node: " + "; ".join(problems))
