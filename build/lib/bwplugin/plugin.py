"""ADD, DEL, CHECK, GC and STATUS: what bwplugin does to the kernel, per command."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bpf, probe, settings, tc
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
    KernelFeatureError,
    NotAvailableError,
)
from .naming import IFB_PREFIX, IfbLabel, format_alias, ifb_name, network_tag, parse_alias
from .netlink import Link, Netlink, NetlinkError
from .protocol import convert_result, host_interface_names, version_at_least, with_interface
from .settings import log
from .shaping import TBFParams, htb_leaf_limit, tbf_params

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


def entry_flags(conf: NetConf) -> int:
    """bwp_val.flags for this config (see bpf/bwplugin.c)."""
    bw, flags = conf.bandwidth, 0
    if bw.egress:
        flags |= bpf.F_EGRESS_SHAPED
    if bw.ingress:
        flags |= bpf.F_INGRESS_SHAPED
    if conf.subnets:
        flags |= bpf.F_SUBNETS | (0 if conf.subnets.listed_shaped else bpf.F_LISTED_UNSHAPED)
    return flags


def owner_of(conf: NetConf, env: Env) -> int:
    return bpf.owner_hash(conf.name, env.container_id, env.ifname)


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
            ifb = _add(nl, env, conf, host, undo)
        except BaseException:
            undo.rollback()
            raise
    return with_interface(result, ifb.name, ifb.mac) if ifb else result


def _add(nl: Netlink, env: Env, conf: NetConf, host: HostVeth, undo: Undo) -> Link | None:
    """Everything that shapes the pod, built so that no packet is steered until the
    last step (the filters); each step registers its undo."""
    bw = conf.bandwidth
    progs = bpf.programs()
    undo.push(progs.close)  # on failure: after the steps below that still need its fds
    mode = probe.redirect_mode(progs, conf.policy.egress_redirect) if bw.egress else "bpf"
    entry = bpf.AttachEntry(
        0, host.index, entry_flags(conf), owner_of(conf, env), bpf.network_hash(conf.name),
        env.ifname, env.container_id,
    )  # fmt: skip
    attach_id = bpf.attach_new(progs.map_fd, entry)
    undo.push(lambda: bpf.release(progs.map_fd, progs.lpm_fd, attach_id))
    if env.pod.known:
        bpf.pod_set(progs.pods_fd, attach_id, bpf.PodEntry(env.pod.namespace, env.pod.name, env.pod.uid))
    if conf.subnets:
        bpf.subnets_add(progs.lpm_fd, attach_id, conf.subnets.networks)
    fault("after-map")
    if bw.ingress:
        _add_root(nl, host.index, "ingress", bw.ingress, conf, host.mtu)
        undo.push(lambda: tc.delete_qdisc(nl, host.index, tc.TC_H_ROOT, tc.ROOT_HANDLE))
        fault("after-ingress")
    ifb = None
    if bw.egress:
        ifb = _add_ifb(nl, env, conf, host, attach_id, undo)
        bpf.attach_set_ifb(progs.map_fd, attach_id, ifb.index)
        _add_root(nl, ifb.index, "egress", bw.egress, conf, host.mtu)
        fault("after-ifb")
    tc.add_clsact(nl, host.index)
    undo.push(lambda: tc.delete_qdisc(nl, host.index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE))
    fault("after-clsact")
    to_pod = "bwp_to_pod"
    tc.add_bpf_filter(nl, host.index, tc.CLSACT_EGRESS, progs.fd(to_pod), progs.filter_name(to_pod), attach_id)
    from_pod, mirred_to = "bwp_from_pod", None
    if ifb is not None and mode == "mirred":
        from_pod, mirred_to = "bwp_from_pod_mirred", ifb.index
    tc.add_bpf_filter(
        nl, host.index, tc.CLSACT_INGRESS, progs.fd(from_pod), progs.filter_name(from_pod), attach_id, mirred_to
    )
    fault("after-filter")
    progs.close()  # the filters hold the programs now; a long-lived agent must not keep fds
    return ifb


def _add_root(nl: Netlink, index: int, what: str, d: Direction, conf: NetConf, mtu: int) -> None:
    params = tbf_params(d, conf.policy, mtu)
    _report_policy(what, d, params, conf.policy)
    if conf.subnets:
        tc.add_htb(nl, index, params, default_shaped=not conf.subnets.listed_shaped, mtu=mtu)
    else:
        tc.add_tbf(nl, index, params)


def _add_ifb(nl: Netlink, env: Env, conf: NetConf, host: HostVeth, attach_id: int, undo: Undo) -> Link:
    name = ifb_name(conf.name, env.container_id, env.ifname)
    _remove_stale_ifb(nl, name)
    try:
        nl.create_link(name, "ifb", mtu=host.mtu)
    except NetlinkError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise KernelFeatureError(f"the kernel has no ifb device type (module ifb): creating {name} failed") from exc
        raise
    ifb = nl.link(name=name)
    assert ifb is not None
    undo.push(lambda: nl.delete_link(ifb.index))
    label = IfbLabel(network_tag(conf.name), attach_id, host.index, env.ifname, env.container_id)
    nl.set_link(ifb.index, up=True, alias=format_alias(label))
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
    """Best effort and idempotent: remove whatever of ours is still there. The map
    entries (found by owner) say where the filters and qdiscs went even when the
    netns, the ifb or prevResult is gone."""
    owner = owner_of(conf, env)
    with Netlink() as nl:
        ifb = nl.link(name=ifb_name(conf.name, env.container_id, env.ifname))
        if ifb is not None and ifb.kind != "ifb":
            ifb = None  # a foreign device with our name: not ours to delete
        host_index = _del_host_index(nl, env, conf)
        map_fd, lpm_fd = bpf.open_map(), bpf.open_lpm()
        try:
            entries = bpf.owner_entries(map_fd, owner) if map_fd is not None else {}
            if host_index is not None:
                teardown_host(nl, host_index)  # the pod's own veth: ours whatever it carries
            for attach_id, entry in entries.items():
                if entry.host_index != host_index:
                    teardown_host(nl, entry.host_index, attach_id)  # only if its filters prove it
            for attach_id in entries:
                assert map_fd is not None
                bpf.release(map_fd, lpm_fd, attach_id)
        finally:
            for fd in (map_fd, lpm_fd):
                if fd is not None:
                    os.close(fd)
        if ifb is not None:
            if ifb_releaser is not None:
                ifb_releaser(ifb)  # already inert: no filter, no map entry points at it
            else:
                nl.delete_link(ifb.index)


def _del_host_index(nl: Netlink, env: Env, conf: NetConf) -> int | None:
    if env.netns and os.path.exists(env.netns):
        try:
            return find_host_veth(nl, env, conf.prev_result).index
        except (HostInterfaceError, InvalidEnvError, InvalidConfigError, OSError):
            pass  # the pod side is half gone; the map entries say where we were
    return None


def teardown_host(nl: Netlink, host_index: int, attach_id: int | None = None) -> bool:
    """Remove our root qdisc and our clsact from a veth. Without attach_id the veth
    is known to be the pod's; with one (an ifindex from the map, which the kernel
    may have reused), only if our filters there carry that id."""
    host = nl.link(index=host_index)
    if host is None or host.kind != "veth":
        return False
    filters = tc.our_filters(nl, host_index)
    if attach_id is not None and attach_id not in {f.classid for f in filters.values()}:
        return False
    if tc.is_our_root(tc.root_qdisc(nl, host_index)):
        tc.delete_qdisc(nl, host_index, tc.TC_H_ROOT, tc.ROOT_HANDLE)
    clsact = tc.clsact_qdisc(nl, host_index)
    if filters and clsact is not None and clsact.kind == "clsact":
        tc.delete_qdisc(nl, host_index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE)
    return True


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
        name = ifb_name(conf.name, env.container_id, env.ifname)
        ifb = nl.link(name=name)
        filters = tc.our_filters(nl, host.index)
        if not bw.shaped:
            if filters or tc.is_our_root(tc.root_qdisc(nl, host.index)) or ifb is not None:
                problems.append(f"{host.name}: shaped by bwplugin but no rate is configured")
        else:
            _check_root(nl, problems, f"ingress qdisc on {host.name}", host.index, bw.ingress, conf, host.mtu)
            if bw.egress:
                if ifb is None or ifb.kind != "ifb":
                    problems.append(f"ifb {name}: missing")
                    ifb = None
                else:
                    if not ifb.up:
                        problems.append(f"ifb {name}: down")
                    _check_root(nl, problems, f"egress qdisc on {name}", ifb.index, bw.egress, conf, host.mtu)
            elif ifb is not None:
                problems.append(f"ifb {name}: present but no egress rate is configured")
            _check_steering(nl, problems, env, conf, host, filters, ifb)
    if problems:
        raise CheckMismatchError("shaping state does not match the config: " + "; ".join(problems))


def _check_root(
    nl: Netlink, problems: list[str], what: str, index: int, d: Direction | None, conf: NetConf, mtu: int
) -> None:
    q = tc.root_qdisc(nl, index)
    if d is None:
        if tc.is_our_root(q):
            problems.append(f"{what}: present but this direction has no rate")
        return
    want = tbf_params(d, conf.policy, mtu)
    kind = "htb" if conf.subnets else "tbf"
    if q is None or q.kind != kind or q.handle != tc.ROOT_HANDLE:
        problems.append(f"{what}: expected bwplugin's {kind} b0d0:, found {q.kind if q is not None else 'none'}")
        return
    if kind == "tbf":
        got = tc.tbf_state(q)
        actual = (got.rate, got.limit, got.buffer_ticks) if got else None
        _compare(problems, what, (want.rate, want.limit, want.buffer_ticks), actual)
        return
    classes = tc.htb_classes(nl, index)
    shaped = classes.get(tc.CLASS_SHAPED)
    leaf = nl.qdisc(index, tc.CLASS_SHAPED)
    limit = tc.bfifo_limit(leaf) if leaf is not None else None
    actual = (shaped.rate, limit or 0, shaped.buffer_ticks) if shaped else None
    expected = (want.rate, htb_leaf_limit(want, mtu), want.buffer_ticks)
    _compare(problems, f"{what} class b0d0:1", expected, actual)
    if tc.CLASS_UNSHAPED not in classes:
        problems.append(f"{what}: unshaped class b0d0:2 missing")


def _compare(problems: list[str], what: str, want: tuple[int, int, int], got: tuple[int, int, int] | None) -> None:
    if got is None:
        problems.append(f"{what}: cannot read its parameters")
        return
    for field, expected, actual in zip(("rate", "limit", "buffer"), want, got, strict=True):
        # the kernel stores the bucket as a time and reports it rounded: allow 0.1 %
        tolerance = max(2, expected // 1000) if field == "buffer" else 0
        if abs(expected - actual) > tolerance:
            problems.append(f"{what}: {field} expected {expected}, actual {actual}")


def _check_steering(
    nl: Netlink,
    problems: list[str],
    env: Env,
    conf: NetConf,
    host: HostVeth,
    filters: dict[int, tc.BPFFilter],
    ifb: Link | None,
) -> None:
    """The clsact filters, the programs they run, and the map entries they read."""
    if tc.clsact_qdisc(nl, host.index) is None:
        problems.append(f"clsact on {host.name}: missing")
    progs = bpf.open_pinned()
    if progs is None:
        problems.append(f"eBPF programs: not pinned under {bpf.pin_dir()}")
        return
    try:
        mode = probe.redirect_mode(progs, conf.policy.egress_redirect) if conf.bandwidth.egress else "bpf"
        mirred_to = ifb.index if ifb is not None and mode == "mirred" else None
        want = {
            tc.CLSACT_EGRESS: ("bwp_to_pod", None),
            tc.CLSACT_INGRESS: ("bwp_from_pod_mirred" if mirred_to else "bwp_from_pod", mirred_to),
        }
        ids = set()
        for hook, (prog, target) in want.items():
            flt = filters.get(hook)
            where = f"{'from-pod' if hook == tc.CLSACT_INGRESS else 'to-pod'} filter on {host.name}"
            if flt is None:
                problems.append(f"{where}: missing")
                continue
            ids.add(flt.classid)
            # a filter attached by an older build of the same map layout keeps running
            # its own program (pinned by the filter): it counts and steers correctly
            older_build = flt.name.startswith(f"bwplugin:{prog}_") and flt.name != progs.filter_name(prog)
            current = flt.name == progs.filter_name(prog) and flt.prog_id == progs.prog_id(prog)
            if not (current or older_build) or flt.direct_action != (target is None):
                problems.append(f"{where}: runs {flt.name} (prog id {flt.prog_id}), expected {prog}")
            if flt.mirred_ifindex != target:
                problems.append(f"{where}: redirects to ifindex {flt.mirred_ifindex}, expected {target}")
        if len(ids) != 1:
            if len(ids) > 1:
                problems.append(f"filters on {host.name}: carry different attachment ids {sorted(ids)}")
            return
        _check_entry(problems, progs, ids.pop(), env, conf, host, ifb)
    finally:
        progs.close()


def _check_entry(
    problems: list[str], progs: bpf.Programs, attach_id: int, env: Env, conf: NetConf, host: HostVeth, ifb: Link | None
) -> None:
    entry = bpf.attach_get(progs.map_fd, attach_id)
    what = f"attach map entry {attach_id}"
    if entry is None:
        problems.append(f"{what}: missing")
        return
    expected = (owner_of(conf, env), host.index, ifb.index if ifb else 0, entry_flags(conf))
    actual = (entry.owner, entry.host_index, entry.ifb_index, entry.flags)
    for field, want, got in zip(("owner", "host ifindex", "ifb ifindex", "flags"), expected, actual, strict=True):
        if want != got:
            problems.append(f"{what}: {field} expected {want}, actual {got}")
    listed = set(bpf.subnets_of(progs.lpm_fd, attach_id)) if entry.flags & bpf.F_SUBNETS else set()
    configured = set(conf.subnets.networks) if conf.subnets else set()
    if listed != configured:
        problems.append(f"{what}: subnets expected {sorted(map(str, configured))}, actual {sorted(map(str, listed))}")


# ---------------------------------------------------------------- GC and STATUS


def cmd_gc(conf: NetConf) -> None:
    """Remove this network's attachments that are not in cni.dev/valid-attachments:
    map entries (and what they point at), then any of its ifbs left without one."""
    if conf.valid_attachments is None:
        return  # nothing tells us what is valid: removing everything would be wrong
    keep = {bpf.owner_hash(conf.name, a.container_id, a.ifname) for a in conf.valid_attachments}
    keep_ifbs = {ifb_name(conf.name, a.container_id, a.ifname) for a in conf.valid_attachments}
    network = bpf.network_hash(conf.name)
    failures: list[str] = []
    with Netlink() as nl:
        map_fd, lpm_fd = bpf.open_map(), bpf.open_lpm()
        try:
            entries = bpf.attach_entries(map_fd) if map_fd is not None else {}
            for attach_id, entry in entries.items():
                if entry.network != network or entry.owner in keep or map_fd is None:
                    continue
                try:
                    teardown_host(nl, entry.host_index, attach_id)
                    _delete_labelled_ifb(nl, entry.ifb_index, attach_id)
                    bpf.release(map_fd, lpm_fd, attach_id)
                except OSError as exc:
                    failures.append(f"attachment {attach_id} ({entry.container_id}/{entry.ifname}): {exc}")
        finally:
            for fd in (map_fd, lpm_fd):
                if fd is not None:
                    os.close(fd)
        tag = network_tag(conf.name)
        for link in nl.links():
            label = parse_alias(link.alias)
            if not link.name.startswith(IFB_PREFIX) or link.kind != "ifb" or label is None:
                continue
            if label.network_tag != tag or link.name in keep_ifbs:
                continue
            try:
                nl.delete_link(link.index)
            except OSError as exc:
                failures.append(f"{link.name} ({label.container_id}/{label.ifname}): {exc}")
    if failures:
        raise IOFailureError(f"GC could not remove {len(failures)} stale attachment(s)", "; ".join(failures))


def _delete_labelled_ifb(nl: Netlink, index: int, attach_id: int) -> None:
    if not index:
        return
    link = nl.link(index=index)
    label = parse_alias(link.alias) if link else None
    if link is not None and link.kind == "ifb" and label is not None and label.attach_id == attach_id:
        nl.delete_link(index)


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


def status_problems(kinds: tuple[str, ...] = ("tbf", "htb", "clsact")) -> list[str]:
    problems = []
    if not os.path.ismount(bpf.BPFFS):
        try:
            bpf.ensure_bpffs()
        except BPFUnavailableError as exc:
            problems.append(exc.msg)
    progs = bpf.open_pinned()
    if progs is None:
        # first ADD will compile: it needs bcc and kernel headers
        if importlib.util.find_spec("bcc") is None:
            problems.append("bcc (python3-bpfcc) is not installed and no compiled program is pinned")
        build = Path(f"/lib/modules/{os.uname().release}/build")
        if not build.exists():
            problems.append(f"kernel headers are missing ({build}) and no compiled program is pinned")
    try:
        missing = probe.missing_kinds(kinds, progs)
    except OSError as exc:
        missing = [f"(the probe itself failed: {exc})"]
    finally:
        if progs is not None:
            progs.close()
    if missing:
        problems.append("the kernel lacks " + ", ".join(missing))
    return problems


def cmd_status() -> None:
    problems = status_problems()
    if problems:
        raise NotAvailableError("bwplugin cannot shape pods on this node: " + "; ".join(problems))
