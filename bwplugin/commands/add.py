"""ADD: shape the pod, building every object so that no packet is steered until
the last step, and undoing all of it, newest first, if any step fails."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from ..cni.config import Direction, Env, NetConf, Policy, Subnets
from ..cni.errors import ForeignObjectError, InvalidConfigError, KernelFeatureError, TryAgainLaterError
from ..cni.protocol import convert_result, with_interface
from ..cni.settings import log
from ..datapath import bpf, probe, tc, tcx
from ..datapath.naming import IfbLabel, format_alias, ifb_name, network_tag
from ..datapath.netlink import Link, Netlink, NetlinkError
from ..datapath.shaping import TBFParams, tbf_params
from .common import HostVeth, Undo, entry_flags, find_host_veth, owner_of, shaping_entry
from .handover import Handover

# Set by the agent: takes an attachment whose counting is to move to TCX links
# once ADD has answered (each TCX attach waits for RCU under the rtnl lock).
tcx_handover: Callable[[Handover], None] | None = None


def _clsact_to_share(nl: Netlink, host: HostVeth) -> bool:
    """Refuse what we cannot share; True if the veth already has another tool's
    clsact, which we then only add our filters to."""
    root = tc.root_qdisc(nl, host.index)
    if root is not None and root.kind != "noqueue":
        raise ForeignObjectError(
            f"host veth {host.name} already has a root qdisc {root.kind} {root.handle >> 16:x}: "
            "bwplugin does not replace qdiscs it did not create"
        )
    ingress = tc.clsact_qdisc(nl, host.index)
    if ingress is None:
        return False
    if ingress.kind != "clsact":
        raise ForeignObjectError(
            f"host veth {host.name} already has qdisc {ingress.kind} at ffff:fff1: bwplugin shares a clsact "
            "but cannot add its egress-hook filter to an ingress qdisc, nor replace it"
        )
    stale = tc.our_classid(nl, host.index)
    if stale is not None:
        raise ForeignObjectError(
            f"host veth {host.name} already carries bwplugin's filters of attachment {stale}: "
            "an earlier ADD for this veth was never deleted"
        )
    return True


def _report_policy(what: str, d: Direction, p: TBFParams, policy: Policy) -> None:
    if p.burst_capped:
        log(f"{what} burst {p.requested_burst} B capped to {p.burst} B (maxBurstMs={policy.max_burst_ms:g})")
    if p.burst_raised:
        log(f"{what} burst {p.requested_burst} B raised to the floor of {p.burst} B")


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
            shared = _clsact_to_share(nl, host)
            ifb = _add(nl, env, conf, host, shared, undo)
        except BaseException:
            undo.rollback()
            raise
    return with_interface(result, ifb.name, ifb.mac) if ifb else result


def _add(nl: Netlink, env: Env, conf: NetConf, host: HostVeth, shared: bool, undo: Undo) -> Link | None:
    """Everything that shapes the pod, built so that no packet is steered until the
    redirect, the last object, and each direction is counted from the moment it is
    shaped; each step registers its undo."""
    bw = conf.bandwidth
    progs = bpf.programs()
    undo.push(progs.close)  # on failure: after the steps below that still need its fds
    mode = probe.redirect_mode(progs, conf.policy.egress_redirect) if bw.egress else "bpf"
    attach_id = _add_entry(progs, env, conf, host, undo)
    use_tcx = probe.attach_mode(progs, conf.policy.tc_attach) == "tcx"
    # through the agent, the TCX links come after the answer (commands/handover.py)
    defer = use_tcx and tcx_handover is not None
    if use_tcx and not bpf.tcx_claim(progs.tcx_fd, progs.map_fd, host.index, attach_id, counts=not defer):
        log(f"ifindex {host.index} ({host.name}) is held by another live attachment: counting with cls_bpf")
        use_tcx = defer = False  # bpf.release (the entry's undo) drops a claim that was made
    counting = "pending" if defer else "tcx" if use_tcx else "tc"
    record = shaping_entry(conf, host, shared, counting, redirect=mode if bw.egress else None)
    bpf.shaping_set(progs.shaping_fd, attach_id, record)
    owner = owner_of(conf, env)
    if use_tcx:
        undo.push(lambda: tcx.detach(owner))

    # the counting programs go first (TCX links, or cls_bpf filters first on their
    # hooks) but count nothing until what they count for is in place: the root
    # qdisc to the pod, the redirect from it (a flag each). Counters and queues
    # then see the same packets, however long the steps between take.
    if not shared:
        _add_clsact(nl, host.index, undo)
    if counting == "tcx":
        for side in ("egress", "ingress"):
            tcx.attach(progs, host.index, owner, side)
    else:
        _add_filter(nl, host.index, tc.CLSACT_EGRESS, tc.FRONT_PRIO, progs, "bwp_to_pod", attach_id, None, undo)
        _add_filter(
            nl, host.index, tc.CLSACT_INGRESS, tc.FRONT_PRIO, progs, "bwp_count_from_pod", attach_id, None, undo
        )
    if bw.ingress:
        add_root(nl, host.index, "ingress", bw.ingress, conf.policy, conf.subnets, host, undo)
    flags = entry_flags(conf) & ~bpf.F_COUNT_FROM_POD
    bpf.attach_update(progs.map_fd, attach_id, flags=flags)
    ifb = None
    if bw.egress:
        label = IfbLabel(network_tag(conf.name), attach_id, host.index, env.ifname, env.container_id)
        ifb = add_ifb(nl, ifb_name(conf.name, env.container_id, env.ifname), label, host.mtu, undo)
        bpf.attach_update(progs.map_fd, attach_id, ifb_index=ifb.index)
        add_root(nl, ifb.index, "egress", bw.egress, conf.policy, conf.subnets, host, undo)
    # the redirect, last on its hook, comes once the ifb and its qdisc are ready,
    # and always (it passes packets on while egress is unshaped), so that a live
    # change only writes the map
    redirect, mirred_to = "bwp_from_pod", None
    if ifb is not None and mode == "mirred":
        redirect, mirred_to = "bwp_from_pod_mirred", ifb.index
    _add_filter(nl, host.index, tc.CLSACT_INGRESS, tc.TAIL_PRIO, progs, redirect, attach_id, mirred_to, undo)
    bpf.attach_update(progs.map_fd, attach_id, flags=flags | bpf.F_COUNT_FROM_POD)
    progs.close()  # the filters hold the programs now; a long-lived agent must not keep fds
    if defer:
        assert tcx_handover is not None
        tcx_handover(Handover(attach_id, owner, host.index))
    return ifb


def _add_filter(
    nl: Netlink, index: int, hook: int, prio: int, progs: bpf.Programs, prog: str, attach_id: int,
    mirred_to: int | None, undo: Undo,
) -> None:  # fmt: skip
    # registered first: a failure (or a kill) right after the kernel made it must
    # not leave it; deleting a filter that was never made is a no-op
    undo.push(lambda: tc.delete_our_filter(nl, index, hook, prio, attach_id))
    tc.add_bpf_filter(nl, index, hook, progs.fd(prog), progs.filter_name(prog), attach_id, mirred_to, prio=prio)


def _add_entry(progs: bpf.Programs, env: Env, conf: NetConf, host: HostVeth, undo: Undo) -> int:
    """The attachment's map entry (its id is allocated by the insert), its subnet
    prefixes and its pod; returns the id."""
    entry = bpf.AttachEntry(
        0, host.index, entry_flags(conf) & ~bpf.F_COUNTING, owner_of(conf, env), bpf.network_hash(conf.name),
        env.ifname, env.container_id,
    )  # fmt: skip
    try:
        attach_id = bpf.attach_new(progs.map_fd, entry)
    except OSError as exc:  # every id taken (ENOSPC), or the map full under a race (E2BIG)
        if exc.errno not in (errno.ENOSPC, errno.E2BIG):
            raise
        raise TryAgainLaterError(
            f"all {bpf.MAX_ATTACH} attachment ids of this node are in use (the most it can shape at once): "
            "delete a shaped pod, or run GC to free those of pods already gone"
        ) from exc
    undo.push(lambda: bpf.release(progs.map_fd, progs.lpm_fd, attach_id))
    if conf.subnets:
        bpf.subnets_add(progs.lpm_fd, attach_id, conf.subnets.networks)
    if env.pod.known:
        bpf.pod_set(progs.pods_fd, attach_id, bpf.PodEntry(env.pod.namespace, env.pod.name, env.pod.uid))
    return attach_id


def add_root(
    nl: Netlink,
    index: int,
    what: str,
    d: Direction,
    policy: Policy,
    subnets: Subnets | None,
    host: HostVeth,
    undo: Undo,
) -> None:
    """The root TBF (or, with subnets, an HTB over the same TBF) that shapes one direction."""
    mtu = host.mtu
    params = tbf_params(d, policy, mtu, host.gso_max)
    _report_policy(what, d, params, policy)
    if subnets:
        tc.add_htb(nl, index, params, default_shaped=not subnets.listed_shaped, mtu=mtu)
    else:
        tc.add_tbf(nl, index, params)
    undo.push(lambda: tc.delete_qdisc(nl, index, tc.TC_H_ROOT, tc.ROOT_HANDLE))


def _add_clsact(nl: Netlink, index: int, undo: Undo) -> None:
    tc.add_clsact(nl, index)
    # ours, but another tool may have added a filter to it meanwhile: only if empty
    undo.push(lambda: tc.clsact_is_empty(nl, index) and tc.delete_qdisc(nl, index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE))


def add_ifb(nl: Netlink, name: str, label: IfbLabel, mtu: int, undo: Undo) -> Link:
    """The attachment's ifb, up and labelled with what DEL and GC need."""
    _remove_stale_ifb(nl, name)
    # registered before the device exists: after this point an ifb of this name is
    # ours (any stale one is gone), and a failure right after creating it, before
    # anything else is known of it, must still remove it
    undo.push(lambda: _delete_ifb_named(nl, name))
    try:
        nl.create_link(name, "ifb", mtu=mtu)
    except NetlinkError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise KernelFeatureError(f"the kernel has no ifb device type (module ifb): creating {name} failed") from exc
        raise
    ifb = nl.link(name=name)
    assert ifb is not None
    nl.set_link(ifb.index, alias=format_alias(label))
    # an ifb with IPv6 sends its own MLD/RS frames through the pod's qdisc: they
    # would spend the pod's budget and make the qdisc count what eBPF never offered
    nl.silence_ipv6(ifb.index)
    nl.set_link(ifb.index, up=True)
    return ifb


def _delete_ifb_named(nl: Netlink, name: str) -> None:
    link = nl.link(name=name)
    if link is not None and link.kind == "ifb":
        nl.delete_link(link.index)


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
