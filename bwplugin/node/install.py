"""Installs the plugin executable into a CNI bin directory (default /opt/cni/bin)
and, by default, a root-owned copy of the package it runs from (/opt/bwplugin/lib):
root runs this code for every pod, so it must not run from a checkout or a venv
that another user can write. Also writes the agent's launcher and systemd unit."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ..datapath.bpf import source_path

DEFAULT_DIR = "/opt/cni/bin"
DEFAULT_LIB = "/opt/bwplugin/lib"
AGENT_LAUNCHER = "bwplugin-agent"  # in the lib directory
CLI_LAUNCHER = "bwplugin-cli"  # in the lib directory: `stats` and `set` where the CNI executable is the forwarder


PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # holds bwplugin/ and bpf/
SYSTEM_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's bcc, needed only to compile


def launcher_text(python: str | None = None, root: str | Path = PACKAGE_ROOT, module: str = "client") -> str:
    """-I: the runtime's environment (PYTHONPATH, user site) must not change the plugin.
    -S: no site processing (~12 ms here); the path is set explicitly instead."""
    python = python or os.path.realpath(sys.executable)
    return (
        f"#!{python} -IS\n"
        f"import sys\n"
        f"sys.path[:0] = [{str(root)!r}, {SYSTEM_PACKAGES!r}]\n"
        f"from bwplugin.node.{module} import main\n"
        f"raise SystemExit(main())\n"
    )


def copy_package(lib: Path) -> None:
    """Every module of the package, and the eBPF C source (as lib/bpf/bwplugin.c, where
    the copy looks for it), into lib/: the plugin needs nothing else at run time.
    Built beside it and swapped in, so an upgrade leaves no stale module behind;
    root-owned, and writable by root only."""
    new = lib.with_name(lib.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    for src in (PACKAGE_ROOT / "bwplugin").rglob("*.py"):
        dst = new / src.relative_to(PACKAGE_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (new / "bpf").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source_path(), new / "bpf" / "bwplugin.c")
    for path in (new, *new.rglob("*")):
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    old = lib.with_name(lib.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if lib.exists():
        os.rename(lib, old)
    os.rename(new, lib)
    shutil.rmtree(old, ignore_errors=True)


def _write_executable(target: Path, content: str | bytes) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    tmp.chmod(0o755)
    os.replace(tmp, target)  # atomic: a runtime never executes half a file
    return target


def install(
    directory: str | Path = DEFAULT_DIR,
    python: str | None = None,
    lib: str | Path | None = None,
    lib_on_host: str | None = None,
    forwarder: str | Path | None = None,
) -> Path:
    """lib: copy the package there and run from the copy (lib=None: run from this
    package where it is, for the test lab); lib_on_host: where the host sees that
    copy (when installing from a container with the host's disk mounted elsewhere).
    forwarder: install that static binary (deploy/forwarder.c) as the CNI
    executable instead, for nodes without Python: it needs the agent, and the
    copy's bwplugin-cli launcher is then the way to `stats` and `set` on the host."""
    root: str | Path = PACKAGE_ROOT
    if lib is not None:
        copy_package(Path(lib))
        root = lib_on_host or lib
        _write_executable(Path(lib) / AGENT_LAUNCHER, launcher_text(python, root, "agent"))
        _write_executable(Path(lib) / CLI_LAUNCHER, launcher_text(python, root))
    if forwarder is not None:
        return _write_executable(Path(directory) / "bwplugin", Path(forwarder).read_bytes())
    return _write_executable(Path(directory) / "bwplugin", launcher_text(python, root))


def systemd_unit_text(lib: str | Path = DEFAULT_LIB) -> str:
    """The agent runs from the root-owned copy too (its launcher in lib/)."""
    return f"""[Unit]
Description=bwplugin node agent (CNI bandwidth shaping; the plugin works without it, slower)
After=local-fs.target
Before=containerd.service crio.service kubelet.service

[Service]
Type=simple
# root, in the host network namespace; state lives in the kernel and bpffs only
ExecStart={lib}/{AGENT_LAUNCHER} --socket /run/bwplugin/agent.sock
Restart=always
RestartSec=1
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=os.environ.get("CNI_BIN_DIR", DEFAULT_DIR), help="CNI bin directory")
    parser.add_argument("--lib", default=DEFAULT_LIB, help=f"where the root-owned copy goes (default {DEFAULT_LIB})")
    parser.add_argument("--lib-on-host", help="the path under which the host sees --lib")
    parser.add_argument("--python", help="interpreter for the executable (default: this one's real path)")
    parser.add_argument(
        "--forwarder", metavar="BINARY",
        help="install this static forwarder as the CNI executable (nodes without Python; the agent is then required)",
    )  # fmt: skip
    parser.add_argument("--systemd-unit", metavar="PATH", help="also write the agent's systemd unit to PATH")
    args = parser.parse_args()
    target = install(args.dir, args.python, args.lib, args.lib_on_host, args.forwarder)
    if args.forwarder:
        print(f"installed {target} (the forwarder: needs the agent); package copy in {args.lib}")
    else:
        print(f"installed {target}, running from {args.lib}")
    if args.systemd_unit:
        Path(args.systemd_unit).write_text(systemd_unit_text(args.lib_on_host or args.lib))
        print(f"wrote {args.systemd_unit}: systemctl daemon-reload && systemctl enable --now bwplugin-agent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
