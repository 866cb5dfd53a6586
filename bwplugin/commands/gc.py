"""GC (CNI 1.1): remove this network's attachments that the runtime no longer
lists, and the ifbs nothing can reach any more."""

from __future__ import annotations

from ..cni.config import NetConf
from ..cni.errors import IOFailureError
from ..datapath import bpf, tc, tcx
from ..datapath.naming import IFB_PREFIX, ifb_name, network_tag, parse_alias
from ..datapath.netlink import Link, Netlink
from . import handover
from .common import teardown_host


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
                    with handover.settled([attach_id]):  # not in the middle of the agent's handover
                        teardown_host(nl, entry.host_index, attach_id)
                        tcx.detach(entry.owner)
                        _delete_labelled_ifb(nl, entry.ifb_index, attach_id)
                        bpf.release(map_fd, lpm_fd, attach_id)
                except OSError as exc:
                    failures.append(f"attachment {attach_id} ({entry.container_id}/{entry.ifname}): {exc}")
            if map_fd is not None:
                # links whose ADD or DEL died half-way: ADD makes the entry before
                # its links, so a pin no entry claims is nobody's
                for owner in tcx.owners_pinned() - {e.owner for e in bpf.attach_entries(map_fd).values()}:
                    try:
                        tcx.detach(owner)
                    except OSError as exc:
                        failures.append(f"TCX links of owner {owner:016x}: {exc}")
                tcx_fd = bpf.open_tcx()
                if tcx_fd is not None:
                    try:
                        bpf.tcx_drop_stale(tcx_fd, map_fd)  # ifindex claims of attachments that are gone
                    finally:
                        bpf.close_fds(tcx_fd)
        finally:
            bpf.close_fds(map_fd, lpm_fd)
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
    """Our ifbs that nothing can reach any more: left by a DEL whose deferred release
    never ran (the agent died). Never deleted on missing evidence: with no attach map
    to read (another pin dir, a layout bump, bpffs remounted) nothing is an orphan;
    an ifb whose map entry claims it (ifb index 0: an ADD is under way) is not; nor
    one that its veth's filter still steers to (that filter carries its id)."""
    map_fd = bpf.open_map()
    if map_fd is None:
        return []
    try:
        out = []
        for link in nl.links():
            label = parse_alias(link.alias)
            if link.kind != "ifb" or label is None or not link.name.startswith(IFB_PREFIX):
                continue
            entry = bpf.attach_get(map_fd, label.attach_id)
            if entry is not None and entry.ifb_index in (0, link.index):
                continue  # live, or its ADD has not recorded it yet
            host = nl.link(index=label.host_index)
            if host is not None and host.kind == "veth" and tc.our_classid(nl, host.index) == label.attach_id:
                continue  # still steered to (an older build's filter, say)
            out.append(link)
        return out
    finally:
        bpf.close_fds(map_fd)
