"""What the kernel holds, read with pyroute2: an implementation independent of
bwplugin's own netlink code, so the tests do not grade their own homework."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from bwplugin.datapath import bpf


@dataclass
class KernelView:
    links: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {index, kind, alias}
    qdiscs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # dev -> [{kind, handle, parent, ...}]
    filters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # dev -> bpf filters on clsact ingress
    out_filters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # dev -> ... on clsact egress
    classes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # dev -> htb classes

    def tbf(self, dev: str) -> dict[str, Any] | None:
        for q in self.qdiscs.get(dev, []):
            if q["kind"] == "tbf" and q["parent"] == 0xFFFFFFFF:
                return q
        return None

    def root(self, dev: str) -> dict[str, Any] | None:
        return next((q for q in self.qdiscs.get(dev, []) if q["parent"] == 0xFFFFFFFF), None)

    def htb_class(self, dev: str, classid: int) -> dict[str, Any] | None:
        return next((c for c in self.classes.get(dev, []) if c["handle"] == classid), None)

    def has_clsact(self, dev: str) -> bool:
        return any(q["kind"] == "clsact" for q in self.qdiscs.get(dev, []))

    def ifbs(self) -> list[str]:
        return [name for name, link in self.links.items() if link["kind"] == "ifb"]


def view(netns: str) -> KernelView:
    out = KernelView()
    with IPRoute(netns=netns) as ipr:
        names = {}
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            name = link.get_attr("IFLA_IFNAME")
            names[link["index"]] = name
            out.links[name] = {
                "index": link["index"],
                "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
                "alias": link.get_attr("IFLA_IFALIAS"),
            }
        for q in ipr.get_qdiscs():
            entry: dict[str, Any] = {"kind": q.get_attr("TCA_KIND"), "handle": q["handle"], "parent": q["parent"]}
            if entry["kind"] == "tbf":
                parms = q.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
                entry.update(rate=parms["rate"], limit=parms["limit"], buffer=parms["buffer"])
            if entry["kind"] == "htb":
                entry["defcls"] = q.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_INIT")["defcls"]
            out.qdiscs.setdefault(names.get(q["index"], str(q["index"])), []).append(entry)
        for index, name in names.items():
            if any(q["kind"] == "htb" for q in out.qdiscs.get(name, [])):
                for c in ipr.get_classes(index=index):
                    parms = c.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
                    out.classes.setdefault(name, []).append(
                        {"handle": c["handle"], "rate": parms["rate"], "quantum": parms["quantum"]}
                    )
            if not out.has_clsact(name):
                continue
            for parent, into in ((0xFFFFFFF2, out.filters), (0xFFFFFFF3, out.out_filters)):
                for f in ipr.get_filters(index=index, parent=parent):
                    opts = f.get_attr("TCA_OPTIONS")
                    if f.get_attr("TCA_KIND") == "bpf" and opts:
                        into.setdefault(name, []).append(
                            {
                                "prio": f["info"] >> 16,
                                "name": opts.get_attr("TCA_BPF_NAME"),
                                "classid": opts.get_attr("TCA_BPF_CLASSID"),
                                "flags": opts.get_attr("TCA_BPF_FLAGS"),
                            }
                        )
    return out


def settled_ifbs(netns: str, timeout: float = 5.0) -> list[str]:
    """The ifbs once pending releases are done: through the agent, DEL answers as soon
    as the attachment is inert and the ifb device is deleted right after."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        kv = view(netns)
        ifbs = kv.ifbs()  # every ifb in the lab's private node namespace, labelled or not
        inert = [n for n in ifbs if kv.links[n]["alias"] is None or not _has_redirect(kv, n)]
        if not inert or time.monotonic() > deadline:
            return ifbs
        time.sleep(0.05)


def _has_redirect(kv: KernelView, ifb: str) -> bool:
    from bwplugin.datapath.naming import parse_alias

    label = parse_alias(kv.links[ifb]["alias"])
    return any(f["classid"] == label.attach_id for fs in kv.filters.values() for f in fs) if label else False


def attach_count() -> int:
    """Entries in the pinned per-attachment maps (attach, pods, shaping records;
    0 for a map that does not exist): every one must go with its attachment."""
    total = 0
    for fd, size in ((bpf.open_map(), bpf.VAL.size), (bpf.open_pods(), bpf.POD_VAL.size),
                     (bpf.open_shaping(), bpf.SHAPING_VAL.size)):  # fmt: skip
        if fd is not None:
            try:
                total += len(bpf.map_items(fd, bpf.KEY.size, size))
            finally:
                os.close(fd)
    return total


def filter_actions(netns: str, dev: str) -> list[str]:
    """Action kinds on a device's clsact-ingress filters, as tc(8) reports them."""
    import json
    import subprocess

    out = subprocess.run(
        ["nsenter", f"--net={netns}", "tc", "-j", "filter", "show", "dev", dev, "ingress"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    kinds = []
    for f in json.loads(out or "[]"):
        for action in f.get("options", {}).get("actions", []):
            kinds.append(action.get("kind"))
    return kinds


def lpm_ids(lpm_fd: int) -> set[int]:
    """Attachment ids that still have prefixes in the LPM trie."""
    return {bpf.LPM_KEY.unpack(k)[1] for k in bpf.map_keys(lpm_fd, bpf.LPM_KEY.size)}
