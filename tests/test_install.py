"""The installer: launcher, package copy for hosts, systemd unit (no root needed)."""

from __future__ import annotations

import json
import os
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


def test_systemd_unit_runs_the_agent_from_the_copy() -> None:
    unit = systemd_unit_text("/opt/x/lib")
    assert "ExecStart=/opt/x/lib/bwplugin-agent --socket /run/bwplugin/agent.sock" in unit
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit


def test_the_default_install_runs_root_owned_code_not_the_checkout(tmp_path: Path, monkeypatch) -> None:
    """bwplugin-install's default is a copy of the package under /opt/bwplugin/lib,
    owned by root and writable by root only, with launchers that name only it."""
    from bwplugin.node import install as installer

    assert installer.DEFAULT_LIB == "/opt/bwplugin/lib"
    lib, checkout = tmp_path / "lib", str(installer.PACKAGE_ROOT)
    monkeypatch.setattr("sys.argv", ["bwplugin-install", "--dir", str(tmp_path / "bin"), "--lib", str(lib)])
    assert installer.main() == 0
    for launcher in (tmp_path / "bin" / "bwplugin", lib / "bwplugin-agent"):
        text = launcher.read_text()
        assert str(lib) in text and checkout not in text, text
    for path in (lib, *lib.rglob("*")):
        st = path.stat()
        assert st.st_mode & 0o022 == 0, path  # nobody but the owner writes
        if os.geteuid() == 0:
            assert st.st_uid == 0, path
    # an upgrade swaps the copy whole: a module the new version lacks is gone
    (lib / "bwplugin" / "stale.py").write_text("")
    assert installer.main() == 0
    assert not (lib / "bwplugin" / "stale.py").exists() and (lib / "bwplugin" / "node" / "agent.py").exists()
    # the agent's launcher runs the agent from the copy
    out = subprocess.run([str(lib / "bwplugin-agent"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--socket" in out.stdout


def test_the_forwarder_install_puts_the_binary_in_and_a_cli_beside_the_copy(tmp_path: Path) -> None:
    """--forwarder (the DaemonSet's way, for nodes without Python): the CNI executable
    is that binary, byte for byte; the package copy gets bwplugin-cli for stats/set."""
    binary = tmp_path / "bwplugin-forward"
    binary.write_bytes(b"\x7fELF" + os.urandom(64))
    exe = install(tmp_path / "bin", lib=tmp_path / "lib", lib_on_host="/opt/bwplugin/lib", forwarder=binary)
    assert exe == tmp_path / "bin" / "bwplugin" and exe.read_bytes() == binary.read_bytes()
    assert os.stat(exe).st_mode & 0o777 == 0o755
    cli = (tmp_path / "lib" / "bwplugin-cli").read_text()
    assert cli.startswith("#!") and "'/opt/bwplugin/lib'" in cli and "bwplugin.node.client" in cli
    assert not list((tmp_path / "bin").glob(".*.tmp"))  # written aside, then renamed in
