"""deploy/forwarder.c, the static CNI executable for nodes without Python: built
here with gcc as deploy/build-image.sh builds it, and run against a socket that
answers with the agent's own framing code (bwplugin.node.agent). No root needed;
the real agent behind it is tested in tests/test_daemonset.py."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lab.lab import build_forwarder
from bwplugin.node.agent import decode_request, encode_reply


@pytest.fixture(scope="module")
def forwarder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_forwarder(tmp_path_factory.mktemp("bwpt-forwarder") / "bwplugin")


def run(exe: Path, command: str, stdin: bytes, env: dict[str, str]) -> tuple[int, dict, str, float]:
    start = time.monotonic()
    proc = subprocess.run([str(exe)], input=stdin, capture_output=True, env={"CNI_COMMAND": command, **env})
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, out, proc.stderr.decode(), time.monotonic() - start


class FakeAgent:
    """A unix socket answering as the agent does (its decode_request and encode_reply)."""

    def __init__(self, path: Path, reply: tuple[int, dict, list[str]]) -> None:
        self.path, self.reply = path, reply
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start(self) -> FakeAgent:
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as rfile:
                self.seen.append(decode_request(rfile.readline(64), rfile.read))
                conn.sendall(encode_reply(*self.reply))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def agent_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.sock"


def test_it_relays_the_cni_protocol_only_and_the_agents_answer(forwarder: Path, agent_path: Path) -> None:
    agent = FakeAgent(agent_path, (0, {"cniVersion": "1.0.0", "ips": []}, ["bwplugin: a log line"])).start()
    try:
        stdin = b'{"cniVersion": "1.0.0", "name": "n", "type": "bwplugin"}'
        env = {"BWPLUGIN_AGENT_SOCKET": str(agent_path), "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
               "CNI_ARGS": "K8S_POD_NAME=web", "BWPLUGIN_BPF_DIR": "/tmp/evil", "LD_PRELOAD": "x"}  # fmt: skip
        code, out, err, _ = run(forwarder, "ADD", stdin, env)
    finally:
        agent.close()
    assert (code, out, err) == (0, {"cniVersion": "1.0.0", "ips": []}, "bwplugin: a log line\n")
    ((sent_env, sent_stdin),) = agent.seen
    assert sent_stdin == stdin
    assert sent_env == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAME=web",
    }


def test_the_agents_exit_code_and_error_pass_through(forwarder: Path, agent_path: Path) -> None:
    agent = FakeAgent(agent_path, (1, {"cniVersion": "1.0.0", "code": 7, "msg": "bad rate"}, [])).start()
    try:
        code, out, _, _ = run(forwarder, "ADD", b"{}", {"BWPLUGIN_AGENT_SOCKET": str(agent_path)})
    finally:
        agent.close()
    assert code == 1 and out["code"] == 7 and out["msg"] == "bad rate"


def test_add_waits_for_a_restarting_agent(forwarder: Path, agent_path: Path) -> None:
    agent = FakeAgent(agent_path, (0, {"cniVersion": "1.0.0"}, []))
    threading.Timer(1.0, agent.start).start()  # the socket appears a second later
    try:
        code, out, _, took = run(forwarder, "ADD", b"{}", {"BWPLUGIN_AGENT_SOCKET": str(agent_path)})
    finally:
        time.sleep(0.1)
        agent.close()
    assert code == 0 and out == {"cniVersion": "1.0.0"} and took >= 0.9, (out, took)


def test_status_and_version_do_not_wait_and_status_says_not_available(forwarder: Path, agent_path: Path) -> None:
    env = {"BWPLUGIN_AGENT_SOCKET": str(agent_path)}
    code, out, _, took = run(forwarder, "STATUS", b'{"cniVersion": "1.1.0", "name": "n"}', env)
    assert code == 1 and out["code"] == 50 and out["cniVersion"] == "1.1.0" and took < 1, (out, took)
    assert f"not reachable at {agent_path}" in out["msg"]
    code, out, _, took = run(forwarder, "VERSION", b'{"cniVersion": "0.4.0"}', env)
    assert code == 1 and out["code"] == 11 and out["cniVersion"] == "0.4.0" and took < 1, (out, took)


def test_an_unusable_socket_path_fails_at_once_and_is_quoted_safely(forwarder: Path, tmp_path: Path) -> None:
    path = f'{tmp_path}/file"\\name'
    Path(path).write_text("not a socket")  # ECONNREFUSED would wait; a regular file is not a socket
    code, out, _, took = run(forwarder, "DEL", b"not json", {"BWPLUGIN_AGENT_SOCKET": path + "/x"})
    assert code == 1 and out["code"] == 11 and out["cniVersion"] == "1.1.0" and took < 1, (out, took)
    assert path in out["msg"]  # the JSON stayed valid with a quote and a backslash in it


def test_arguments_are_refused_with_where_to_go(forwarder: Path) -> None:
    proc = subprocess.run([str(forwarder), "stats"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bwplugin-cli" in proc.stderr
