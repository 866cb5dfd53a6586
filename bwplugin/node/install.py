"""Installs the plugin executable into a CNI bin directory (default /opt/cni/bin),
optionally with a copy of the package (for a node that runs the agent from a
container image: the executable runs on the host), and writes the agent's systemd unit."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ..datapath.bpf import source_path

DEFAULT_DIR = "/opt/cni/bin"


PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # holds bwplugin/ and bpf/
SYSTEM_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's bcc, needed only to compile


def launcher_text(python: str | None = None, root: str | Path = PACKAGE_ROOT) -> str:
    """-I: the runtime's environment (PYTHONPATH, user site) must not change the plugin.
    -S: no site processing (~12 ms here); the path is set explicitly instead."""
    python = python or os.path.realpath(sys.executable)
    return (
        f"#!{python} -IS\n"
        f"import sys\n"
        f"sys.path[:0] = [{str(root)!r}, {SYSTEM_PACKAGES!r}]\n"
        f"from bwplugin.node.client import main\n"
        f"raise SystemExit(main())\n"
    )


def copy_package(lib: Path) -> None:
    """Every module of the package, and the eBPF C source (as lib/bpf/bwplugin.c, where
    the copy looks for it), into lib/: the plugin needs nothing else at run time."""
    for src in (PACKAGE_ROOT / "bwplugin").rglob("*.py"):
        dst = lib / src.relative_to(PACKAGE_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    (lib / "bpf").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source_path(), lib / "bpf" / "bwplugin.c")


def install(
    directory: str | Path = DEFAULT_DIR,
    python: str | None = None,
    lib: str | Path | None = None,
    lib_on_host: str | None = None,
) -> Path:
    """lib: copy the package there; lib_on_host: where the host sees that copy
    (when installing from a container with the host's disk mounted elsewhere)."""
    root: str | Path = PACKAGE_ROOT
    if lib is not None:
        copy_package(Path(lib))
        root = lib_on_host or lib
    target = Path(directory) / "bwplugin"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".bwplugin.tmp")
    tmp.write_text(launcher_text(python, root))
    tmp.chmod(0o755)
    os.replace(tmp, target)  # atomic: a runtime never executes half a file
    return target


def systemd_unit_text(python: str | None = None) -> str:
    python = python or sys.executable  # the venv's, which sees the package and bcc
    return f"""[Unit]
Description=bwplugin node agent (CNI bandwidth shaping; the plugin works without it, slower)
After=local-fs.target
Before=containerd.service crio.service kubelet.service

[Service]
Type=simple
# root, in the host network namespace; state lives in the kernel and bpffs only
ExecStart={python} -m bwplugin.node.agent --socket /run/bwplugin/agent.sock
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
    parser.add_argument("--lib", help="copy the package here and run the executable from the copy")
    parser.add_argument("--lib-on-host", help="the path under which the host sees --lib")
    parser.add_argument("--python", help="interpreter for the executable (default: this one's real path)")
    parser.add_argument("--systemd-unit", metavar="PATH", help="also write the agent's systemd unit to PATH")
    args = parser.parse_args()
    print(f"installed {install(args.dir, args.python, args.lib, args.lib_on_host)}")
    if args.systemd_unit:
        Path(args.systemd_unit).write_text(systemd_unit_text())
        print(f"wrote {args.systemd_unit}: systemctl daemon-reload && systemctl enable --now bwplugin-agent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
