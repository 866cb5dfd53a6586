"""The installer: launcher, package copy for hosts, systemd unit (no root needed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bwplugin.node.install import install, systemd_unit_text


def run(exe: Path, command: str, stdin: dict[str, object], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(exe)], input=json.dumps(stdin), capture_output=True, text=True,
        env={"CNI_COMMAND": command, "BWPLUGIN_NO_AGENT": "1", **env},
    )  # fmt: skip


def test_launcher_runs_from_a_package_copy(tmp_path: Path) -> None:
    exe = install(tmp_path / "bin", lib=tmp_path / "lib")
    assert (tmp_path / "lib" / "bwplugin" / "node" / "client.py").exists()
    assert (tmp_path / "lib" / "bpf" / "bwplugin.c").exists()
    assert f"'{tmp_path / 'lib'}'" in exe.read_text() and exe.read_text().startswith("#!")
    out = run(exe, "VERSION", {"cniVersion": "0.4.0"})
    assert out.returncode == 0 and json.loads(out.stdout)["cniVersion"] == "0.4.0"
    err = run(exe, "ADD", {"cniVersion": "1.0.0", "name": "n"}, CNI_CONTAINERID="c", CNI_IFNAME="eth0")
    assert err.returncode == 1 and json.loads(err.stdout)["code"] == 4  # CNI_NETNS missing


def test_lib_on_host_path_is_what_the_launcher_uses(tmp_path: Path) -> None:
    exe = install(tmp_path / "bin", lib=tmp_path / "lib", lib_on_host="/opt/bwplugin")
    assert "'/opt/bwplugin'" in exe.read_text()


def test_without_an_agent_socket_the_executable_falls_back(tmp_path: Path) -> None:
    exe = install(tmp_path / "bin")
    out = subprocess.run(
        [str(exe)], input='{"cniVersion": "1.0.0"}', capture_output=True, text=True,
        env={"CNI_COMMAND": "VERSION", "BWPLUGIN_AGENT_SOCKET": str(tmp_path / "none.sock")},
    )  # fmt: skip
    assert out.returncode == 0 and "supportedVersions" in out.stdout


def test_systemd_unit() -> None:
    unit = systemd_unit_text("/opt/x/python")
    assert "ExecStart=/opt/x/python -m bwplugin.node.agent --socket /run/bwplugin/agent.sock" in unit
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit
