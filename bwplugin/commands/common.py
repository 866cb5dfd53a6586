"""What every CNI command shares: finding the pod's host veth, the attachment's
map-entry identity, the rollback stack, and removing our objects from a veth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..cni.config import Bandwidth, Direction, Env, NetConf, Subnets
from ..cni.errors import HostInterfaceError, InvalidEnvError
from ..cni.protocol import host_interface_names
from ..cni.settings import log
from ..datapath import bpf, tc
from ..datapath.netlink import Netlink


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
    gso_max: int  # the largest GSO packet either end of the pair may build or pass


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
    return HostVeth(host.index, host.name, host.mtu or 1500, max(host.gso_max, link.gso_max))


def entry_flags(conf: NetConf) -> int:
    """bwp_val.flags for this config, as a finished ADD leaves them (see bpf/bwplugin.c)."""
    bw, flags = conf.bandwidth, bpf.F_COUNTING
    if bw.egress:
        flags |= bpf.F_EGRESS_SHAPED
    if bw.ingress:
        flags |= bpf.F_INGRESS_SHAPED
    if conf.subnets:
        flags |= bpf.F_SUBNETS | (0 if conf.subnets.listed_shaped else bpf.F_LISTED_UNSHAPED)
    return flags


def owner_of(conf: NetConf, env: Env) -> int:
    return bpf.owner_hash(conf.name, env.container_id, env.ifname)


def teardown_host(nl: Netlink, host_index: int, attach_id: int | None = None) -> bool:
    """Remove our root qdisc and our filters from a veth, and the clsact if we made
    it and nothing else is on it. Without attach_id the veth is known to be the
    pod's; with one (an ifindex from the map, which the kernel may have reused),
    only if our filters there carry that id."""
    host = nl.link(index=host_index)
    if host is None or host.kind != "veth":
        return False
    filters, foreign = tc.scan_hooks(nl, host_index)
    if attach_id is not None and attach_id not in {f.classid for f in filters.values()}:
        return False
    if tc.is_our_root(tc.root_qdisc(nl, host_index)):
        tc.delete_qdisc(nl, host_index, tc.TC_H_ROOT, tc.ROOT_HANDLE)
    if not filters:
        return True
    clsact = tc.clsact_qdisc(nl, host_index)
    shared = _clsact_shared({f.classid for f in filters.values()})
    if not foreign and clsact is not None and clsact.kind == "clsact" and not shared:
        tc.delete_qdisc(nl, host_index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE)  # ours, and only ours on it
        return True
    for (hook, prio), f in filters.items():
        tc.delete_filter(nl, host_index, hook, prio, f.handle)
    if not shared and tc.clsact_is_empty(nl, host_index):
        tc.delete_qdisc(nl, host_index, tc.TC_H_CLSACT, tc.CLSACT_HANDLE)  # the other tool's filters left first
    return True


def _clsact_shared(attach_ids: set[int]) -> bool:
    """Did ADD find the clsact there (another tool's)? Without a record to say so,
    it is taken as ours: builds before sharing always made their own."""
    fd = bpf.open_shaping()
    if fd is None:
        return False
    try:
        return any((rec := bpf.shaping_get(fd, i)) is not None and rec.flags & bpf.S_CLSACT_SHARED for i in attach_ids)
    finally:
        bpf.close_fds(fd)


REDIRECT_FLAGS = {"auto": 0, "bpf": bpf.S_REDIRECT_BPF, "mirred": bpf.S_REDIRECT_MIRRED}


def recorded_redirect(flags: int) -> str:
    """The redirect an attachment's record names ("auto": none, as in records of
    builds that kept only a forced choice)."""
    return "mirred" if flags & bpf.S_REDIRECT_MIRRED else "bpf" if flags & bpf.S_REDIRECT_BPF else "auto"


COUNTING_FLAGS = {"tc": 0, "tcx": bpf.S_TCX, "pending": bpf.S_TCX_PENDING}


def shaping_entry(
    conf: NetConf, host: HostVeth, shared_clsact: bool = False, counting: str = "tc", redirect: str | None = None
) -> bpf.ShapingEntry:
    """What ADD shapes with, recorded for live changes and for CHECK after one.
    counting: "tc" (cls_bpf filters), "tcx" (TCX links), "pending" (cls_bpf
    until the agent's handover to TCX links, commands/handover.py).
    redirect: the redirect ADD chose for egress ("bpf" or "mirred", where "auto"
    was probed), so that CHECK and live changes hold to it rather than to a later
    probe's answer; None: the config's own (egress not shaped yet)."""
    bw = conf.bandwidth
    rates = ((bw.ingress.rate, bw.ingress.burst) if bw.ingress else (0, 0),
             (bw.egress.rate, bw.egress.burst) if bw.egress else (0, 0))  # fmt: skip
    flags = REDIRECT_FLAGS[redirect or conf.policy.egress_redirect] | (bpf.S_STATIC if bw.source == "static" else 0)
    flags |= (bpf.S_CLSACT_SHARED if shared_clsact else 0) | COUNTING_FLAGS[counting]
    return bpf.ShapingEntry(
        add=rates, now=rates,
        subnets_digest=bpf.subnets_digest(conf.subnets.networks if conf.subnets else ()),
        latency_us=round(conf.policy.latency_ms * 1000), max_burst_us=round(conf.policy.max_burst_ms * 1000),
        mtu=host.mtu, gso_max=host.gso_max, flags=flags,
    )  # fmt: skip


def direction_of(pair: tuple[int, int]) -> Direction | None:
    return Direction(*pair) if pair[0] else None


def in_force(conf: NetConf, shaping: bpf.ShapingEntry | None, listed: list[Any] | None) -> NetConf:
    """The config as it stands after live changes: ADD's, with the overridden
    rates (and subnets) taken from the attachment's record. `listed`: the
    attachment's prefixes now, used only under a subnet override."""
    if shaping is None:
        return conf
    flags, bw = shaping.flags, conf.bandwidth
    ingress = direction_of(shaping.now[bpf.INGRESS]) if flags & bpf.S_INGRESS_OVERRIDE else bw.ingress
    egress = direction_of(shaping.now[bpf.EGRESS]) if flags & bpf.S_EGRESS_OVERRIDE else bw.egress
    subnets = conf.subnets
    if flags & bpf.S_SUBNETS_OVERRIDE and conf.subnets:
        subnets = Subnets(bool(flags & bpf.S_SHAPED_LIST), tuple(listed or ()))
    return replace(conf, bandwidth=Bandwidth(ingress, egress, bw.source), subnets=subnets)
