"""What the kernel holds, read with pyroute2: an implementation independent of
bwplugin's own netlink code, so the tests do not grade their own homework."""

from __future__ import annotations

import functools
import json
import os
import subprocess
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

    def leaf_tbf(self, dev: str) -> dict[str, Any] | None:
        """Subnet mode's shaping TBF, under the HTB's shaped class b0d0:1."""
        return next((q for q in self.qdiscs.get(dev, []) if q["kind"] == "tbf" and q["parent"] == 0xB0D00001), None)

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
                    if c.get_attr("TCA_KIND") != "htb":
                        continue  # the TBF leaf's own class
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
    """Entries in the pinned per-attachment maps (attach, pods, shaping records,
    TCX ifindex claims; 0 for a map that does not exist) and pinned TCX links:
    every one must go with its attachment."""
    total = len(link_pins())
    for fd, size in ((bpf.open_map(), bpf.VAL.size), (bpf.open_pods(), bpf.POD_VAL.size),
                     (bpf.open_shaping(), bpf.SHAPING_VAL.size), (bpf.open_tcx(), bpf.KEY.size)):  # fmt: skip
        if fd is not None:
            try:
                total += len(bpf.map_items(fd, bpf.KEY.size, size))
            finally:
                os.close(fd)
    return total


def link_pins(pin_dir: str | None = None) -> list[str]:
    """Pinned TCX links in the pin directory, by name."""
    path = pin_dir or os.environ.get("BWPLUGIN_PIN_DIR", "/sys/fs/bpf/bwplugin")
    try:
        return sorted(p for p in os.listdir(path) if p.startswith("tcx_link_"))
    except FileNotFoundError:
        return []


def filter_actions(netns: str, dev: str) -> list[str]:
    """Action kinds on a device's clsact-ingress filters, as tc(8) reports them."""
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


def tcx_chain(netns: str, dev: str, hook: str) -> list[str]:
    """Names of the programs on a device's TCX hook, in the order they run: a raw
    bpf(BPF_PROG_QUERY) made here (bpftool 7.1 predates TCX), independent of
    bwplugin's libbpf wrappers, and names from bpftool."""
    import ctypes
    import socket
    import struct
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    sys_bpf, prog_query, clone_newnet = 321, 16, 0x40000000  # x86_64
    attach_type = {"ingress": 46, "egress": 47}[hook]  # BPF_TCX_INGRESS, BPF_TCX_EGRESS
    out: dict[str, Any] = {}

    def run() -> None:  # in a thread of its own: setns moves only this thread
        fd = os.open(netns, os.O_RDONLY)
        try:
            assert libc.setns(fd, clone_newnet) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        ids = (ctypes.c_uint32 * 64)()
        attr = ctypes.create_string_buffer(72)
        # union bpf_attr.query: target_ifindex, attach_type, query_flags, attach_flags, prog_ids, count
        struct.pack_into("=IIIIQI", attr, 0, socket.if_nametoindex(dev), attach_type, 0, 0, ctypes.addressof(ids), 64)
        if libc.syscall(sys_bpf, prog_query, attr, 72) != 0:
            out["error"] = os.strerror(ctypes.get_errno())
            return
        out["ids"] = list(ids[: struct.unpack_from("=I", attr.raw, 24)[0]])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "error" not in out, out["error"]
    names = []
    for prog_id in out["ids"]:
        info = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
        names.append(json.loads(info.stdout).get("name", "?") if info.returncode == 0 else "?")
    return names


@functools.cache
def kernel_has_tcx() -> bool:
    """Does the running kernel have TCX (CONFIG_NET_XGRESS, Linux 6.6+)? Read from
    its symbol table, not from bwplugin's probe."""
    with open("/proc/kallsyms") as fh:
        return any(line.rstrip().endswith(" tcx_link_attach") for line in fh)


def settled_tcx_chain(netns: str, dev: str, hook: str, timeout: float = 5.0) -> list[str]:
    """tcx_chain once it stops changing: the agent detaches a deleted attachment's
    links just after DEL has answered, as it deletes its ifb."""
    import time

    deadline = time.monotonic() + timeout
    names = tcx_chain(netns, dev, hook)
    while any(n.startswith("bwp_tcx_") for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)
        names = tcx_chain(netns, dev, hook)
    return names


def pinned_ids(name: str, pin_dir: str | None = None) -> set[int]:
    """The u32 keys (attachment ids) of a pinned map, dumped by bpftool rather than
    read with bwplugin's own bpf code."""
    path = os.path.join(pin_dir or os.environ.get("BWPLUGIN_PIN_DIR", "/sys/fs/bpf/bwplugin"), name)
    if not os.path.exists(path):
        return set()
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", path], capture_output=True, text=True, check=True)
    return {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") for e in json.loads(out.stdout)}


def after_handover(netns: str, dev: str, through_agent: bool) -> None:
    """Where ADD went through the agent on a kernel with TCX, wait for the agent's
    move of the veth's counting to TCX links, so that what a test reads next is the
    settled state; elsewhere nothing moves after ADD answered."""
    if through_agent and kernel_has_tcx():
        handed_over(netns, dev)


def handed_over(netns: str, dev: str, timeout: float = 5.0) -> float:
    """Seconds until bwplugin's TCX programs head both hooks of the veth and its
    cls_bpf counting filters (prio 0xb0d) are gone: through the agent, ADD answers
    with cls_bpf counting and the agent moves it to TCX links right after.
    Read with a raw BPF_PROG_QUERY and tc(8); fails past the timeout."""
    import time

    start = time.monotonic()
    while True:
        heads = [(tcx_chain(netns, dev, hook) or ["-"])[0] for hook in ("ingress", "egress")]
        prios = set()
        for hook in ("ingress", "egress"):
            out = subprocess.run(
                ["nsenter", f"--net={netns}", "tc", "-j", "filter", "show", "dev", dev, hook],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            prios |= {f.get("pref") for f in json.loads(out or "[]")}
        if heads == ["bwp_tcx_from_pod", "bwp_tcx_to_pod"] and 0xB0D not in prios:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"no handover to TCX on {dev} within {timeout} s: {heads} {prios}"
        time.sleep(0.01)
