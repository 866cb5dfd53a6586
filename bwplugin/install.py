"""Installs the plugin executable into a CNI bin directory (default /opt/cni/bin)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DIR = "/opt/cni/bin"
REFERENCE_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's bcc, needed only to compile


def launcher_text(python: str | None = None) -> str:
    """-I: the runtime's environment (PYTHONPATH, user site) must not change the plugin.
    -S: no site processing (~12 ms here); the path is set explicitly instead."""
    python = python or os.path.realpath(sys.executable)
    return (
        f"#!{python} -IS\n"
        f"import sys\n"
        f"sys.path[:0] = [{str(PACKAGE_ROOT)!r}, {SYSTEM_PACKAGES!r}]\n"
        f"from bwplugin.client import main\n"
        f"raise SystemExit(main())\n"
    )


def install(directory: str | Path = DEFAULT_DIR, python: str | None = None) -> Path:
    target = Path(directory) / "bwplugin"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".bwplugin.tmp")
    tmp.write_text(launcher_text(python))
    tmp.chmod(0o755)
    os.replace(tmp, target)  # atomic: a runtime never executes half a file
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=os.environ.get("CNI_BIN_DIR", DEFAULT_DIR))
    args = parser.parse_args()
    print(f"installed {install(args.dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
