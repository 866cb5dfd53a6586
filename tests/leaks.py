"""The session-end leak check, counted with tools that share no code with bwplugin
(iproute2, bpftool, /proc): whatever the tests made that is still there when the
last one ends. A snapshot taken at the start is subtracted, so only this session's
leftovers count."""

from __future__ import annotations

import glob
import json
import os
import subprocess
from dataclasses import dataclass

PREFIX = "bwpt"


@dataclass(frozen=True)
class Snapshot:
    items: frozenset[str]

    def new_since(self, before: Snapshot) -> list[str]:
        return sorted(self.items - before.items)


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def _map_entries(pin: str) -> int:
    out = _run("bpftool", "-j", "map", "dump", "pinned", pin)
    try:
        dump = json.loads(out or "[]")
    except ValueError:
        return 0
    return len(dump) if isinstance(dump, list) else 0  # a program pin answers with an error object


def take(pin_dir: str | None) -> Snapshot:
    items: set[str] = set()
    for name in _run("ip", "netns", "list").split():
        if name.startswith(PREFIX):
            items.add(f"netns {name}")
    for line in _run("ip", "-o", "link").splitlines():  # the root netns: the lab keeps its own elsewhere
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(("bwp", "ifb")):
            items.add(f"link {name}")
    for line in _run("tc", "qdisc", "show").splitlines():
        if "clsact" in line or " tbf " in line or " htb " in line:
            items.add(f"qdisc {line.strip()}")
    me = os.getpid()
    for proc in glob.glob("/proc/[0-9]*"):
        pid = int(proc.rsplit("/", 1)[1])
        try:
            with open(f"{proc}/cmdline", "rb") as fh:
                argv = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if pid != me and PREFIX in argv:
            items.add(f"process {pid} {argv[:120]}")
    with open("/proc/mounts") as fh:
        items |= {f"mount {line.split()[1]}" for line in fh if PREFIX in line.split()[1]}
    items |= {f"dir {p}" for p in glob.glob(f"/tmp/{PREFIX}*")}
    items |= {f"pin {p}" for p in glob.glob(f"/sys/fs/bpf/{PREFIX}*") if not pin_dir or p != pin_dir}
    if pin_dir and os.path.isdir(pin_dir):
        for name in os.listdir(pin_dir):
            path = os.path.join(pin_dir, name)
            if name.startswith("tcx_link_"):
                items.add(f"pinned link {path}")
            elif (n := _map_entries(path)) > 0:
                items.add(f"map {path}: {n} entries")
    items |= {f"cni cache {p}" for p in glob.glob(f"/var/lib/cni/results/*{PREFIX}*")}
    return Snapshot(frozenset(items))
