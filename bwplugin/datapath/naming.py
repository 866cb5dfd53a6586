"""Names and labels of the objects bwplugin creates. Pure.

The ifb's name is a hash of (network, container ID, ifname): two attachments of
one container never collide (the reference hashes network + container only).
The ifb's alias records what DEL and GC need when the netns or prevResult is
gone, so the kernel, not a state file, is the source of truth."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

IFB_PREFIX = "bwpl"  # 'l' is not hex: never collides with the reference's "bwp" + 12 hex
ALIAS_TAG = "bwplugin"
IFALIASZ = 255


def attachment_digest(network: str, container_id: str, ifname: str) -> bytes:
    """The identity of one attachment: its ifb's name and its map entries' owner."""
    return hashlib.sha256(f"{network}\0{container_id}\0{ifname}".encode()).digest()


def ifb_name(network: str, container_id: str, ifname: str) -> str:
    return IFB_PREFIX + attachment_digest(network, container_id, ifname).hex()[: 15 - len(IFB_PREFIX)]


def network_tag(network: str) -> str:
    return hashlib.sha256(network.encode()).hexdigest()[:12]


# The map entries keep the first 8 bytes of each digest as a little-endian u64
# (bpf.owner_hash, bpf.network_hash): the names follow from those alone, which a
# live change needs (it knows the attachment, not the network's name).
def ifb_name_of_owner(owner: int) -> str:
    return IFB_PREFIX + owner.to_bytes(8, "little").hex()[: 15 - len(IFB_PREFIX)]


def network_tag_of(network_hash: int) -> str:
    return network_hash.to_bytes(8, "little").hex()[:12]


@dataclass(frozen=True)
class IfbLabel:
    network_tag: str
    attach_id: int  # key of the pinned attach map, and the bpf filter's classid
    host_index: int
    ifname: str
    container_id: str


def format_alias(label: IfbLabel) -> str:
    text = (
        f"{ALIAS_TAG} net={label.network_tag} id={label.attach_id} host={label.host_index} "
        f"if={label.ifname} cid={label.container_id}"
    )
    return text[:IFALIASZ]  # a very long container ID is truncated; GC matches on the name


def parse_alias(alias: str | None) -> IfbLabel | None:
    if not alias or not alias.startswith(ALIAS_TAG + " "):
        return None
    fields = dict(p.split("=", 1) for p in alias.split()[1:] if "=" in p)
    try:
        return IfbLabel(fields["net"], int(fields["id"]), int(fields["host"]), fields["if"], fields.get("cid", ""))
    except (KeyError, ValueError):
        return None
