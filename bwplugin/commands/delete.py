"""DEL: best effort and idempotent; removes whatever of this attachment is left."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..cni.config import Env, NetConf
from ..cni.errors import HostInterfaceError, InvalidConfigError, InvalidEnvError
from ..datapath import bpf, tc, tcx
from ..datapath.naming import ifb_name, parse_alias
from ..datapath.netlink import Link, Netlink
from . import handover
from .common import find_host_veth, owner_of, teardown_host

# Set by the agent: hands an inert ifb to a background thread, because deleting a
# netdev waits for RCU (15-30 ms) and nothing about the pod depends on it any more.
ifb_releaser: Callable[[Link], None] | None = None
# Likewise for TCX links (fds of unpinned links): detaching one waits for RCU too.
link_releaser: Callable[[list[int]], None] | None = None


def cmd_del(env: Env, conf: NetConf) -> None:
    """Best effort and idempotent: remove whatever of ours is still there. The map
    entries (found by owner) say where the filters and qdiscs went even when the
    netns, the ifb or prevResult is gone, and are the proof needed to touch a veth."""
    owner = owner_of(conf, env)
    with Netlink() as nl:
        ifb = nl.link(name=ifb_name(conf.name, env.container_id, env.ifname))
        if ifb is not None and ifb.kind != "ifb":
            ifb = None  # a foreign device with our name: not ours to delete
        host_index = _del_host_index(nl, env, conf)
        map_fd, lpm_fd = bpf.open_map(), bpf.open_lpm()
        try:
            entries = bpf.owner_entries(map_fd, owner) if map_fd is not None else {}
            proven = any(entry.host_index == host_index for entry in entries.values())
            if host_index is not None and not proven and _ifb_vouches_for(nl, ifb, host_index):
                teardown_host(nl, host_index)  # its map entry is gone, but its ifb names the veth
            with handover.settled(list(entries)):  # not in the middle of the agent's handover
                for attach_id, entry in entries.items():
                    # a veth is touched only with proof that its objects are this attachment's:
                    # its map entry names it and CNI_NETNS leads to it, or its filters carry the
                    # entry's id. CNI_NETNS alone proves nothing: without prevResult, a reused
                    # /proc/<pid>/ns/net can lead to another pod's veth.
                    teardown_host(nl, entry.host_index, None if entry.host_index == host_index else attach_id)
                # the links are named by owner: found even with no entry, veth or netns left
                links = tcx.unpin(owner)
                for attach_id in entries:
                    assert map_fd is not None
                    bpf.release(map_fd, lpm_fd, attach_id)  # the links are inert from here on
            if host_index is not None and map_fd is not None:
                _drop_stale_claim(map_fd, host_index)
            if links and link_releaser is not None:
                link_releaser(links)
            else:
                tcx.release(links)
        finally:
            bpf.close_fds(map_fd, lpm_fd)
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


def _ifb_vouches_for(nl: Netlink, ifb: Link | None, host_index: int) -> bool:
    """This attachment's ifb (ours by its hashed name) records the veth's ifindex and
    the attachment id, and the veth's filters carry that id: proof without the map."""
    label = parse_alias(ifb.alias) if ifb is not None else None
    return label is not None and label.host_index == host_index and tc.our_classid(nl, host_index) == label.attach_id


def _drop_stale_claim(map_fd: int, host_index: int) -> None:
    """The pod's veth may still be claimed for TCX by an attachment whose entry is
    gone (removed by hand, or a DEL that died between its steps)."""
    fd = bpf.open_tcx()
    if fd is not None:
        try:
            bpf.tcx_drop_stale(fd, map_fd, host_index)
        finally:
            bpf.close_fds(fd)
