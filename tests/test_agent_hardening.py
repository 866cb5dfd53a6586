"""The node agent under hostile or careless callers, and while it stops: a request
cannot steer it, only root is served, garbage and slow clients do not take it
down or grow it without bound, its socket's directory is its own, and SIGTERM
lets requests in flight finish."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.lab.lab import Lab
from bench.lab.libcni import PluginFailed, plugin_conf
from bwplugin.commands import gc
from bwplugin.datapath import bpf, tc
from bwplugin.datapath.naming import ifb_name
from bwplugin.datapath.netlink import Netlink
from bwplugin.node.agent import CLIENT_TIMEOUT, MAX_CLIENTS
from bwplugin.node.client import decode_reply, encode_request

from .conftest import bandwidth, host_veth, shaper
from .oracle import view

pytestmark = pytest.mark.kernel
RATE = 10_000_000
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def agent_lab():
    with Lab(agent=True) as lab:
        yield lab


def ask(path: str, env: dict[str, str], stdin: bytes, timeout: float = 30) -> tuple[int, dict | None, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)  # blocking, as the thin client connects: waits in the backlog
        sock.settimeout(timeout)
        sock.sendall(encode_request(env, stdin))
        sock.shutdown(socket.SHUT_WR)
        code, out, err = decode_reply(sock.makefile("rb").read())
    return code, json.loads(out) if out.strip() else None, err


def agent_status(lab: Lab) -> dict[str, int]:
    assert lab.agent is not None and lab.agent.poll() is None, "the agent died"
    # the lab starts the agent through nsenter, which execs it: same pid
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{lab.agent.pid}/status").read_text().splitlines())
    return {"threads": int(fields["Threads"]), "rss_kib": int(fields["VmRSS"].split()[0])}


VERSION = ({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')


def test_request_variables_cannot_steer_the_agent(agent_lab: Lab) -> None:
    """An ADD whose request carries BWPLUGIN_* settings: the agent compiles, pins and
    behaves by its own settings. (The lab's agent has the tests' fault hooks: were
    the request's BWPLUGIN_FAULT honoured, it would SIGKILL itself.)"""
    lab = agent_lab
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))  # ptp alone: the result bwplugin chains on
    conf = plugin_conf(att.conflist, shaper(), att.result, bandwidth(ingress=RATE, egress=RATE))
    evil_pins = f"/sys/fs/bpf/bwpt-evil-{lab.tag}"
    env = {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": att.container_id, "CNI_NETNS": pod.netns, "CNI_IFNAME": "eth0",
        "CNI_PATH": str(lab.bin_dir),
        "BWPLUGIN_FAULT": "after-map:kill", "BWPLUGIN_PIN_DIR": evil_pins, "BWPLUGIN_BPF_DIR": "/nonexistent",
    }  # fmt: skip
    code, out, err = ask(lab.agent_socket, env, json.dumps(conf).encode())
    try:
        assert code == 0, (out, err)
        assert agent_status(lab)  # alive
        assert not os.path.exists(evil_pins)
        assert view(lab.node).tbf(host_veth(pod)) is not None
    finally:
        lab.exec_shaper("DEL", pod, conf)


def test_only_root_is_served_whatever_the_socket_mode(agent_lab: Lab) -> None:
    """SO_PEERCRED, not only the file mode: with the socket opened up to everyone,
    a process of uid 65534 still gets a refusal (and nothing is done)."""
    sock = agent_lab.agent_socket
    os.chmod(agent_lab.tmp, 0o711)  # the lab's private directory, opened for this test
    os.chmod(os.path.dirname(sock), 0o755)
    os.chmod(sock, 0o777)
    script = (
        "import json, socket, sys; from bwplugin.node.client import encode_request, decode_reply\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(encode_request({'CNI_COMMAND': 'VERSION'}, b'{}')); s.shutdown(socket.SHUT_WR)\n"
        "print(decode_reply(s.makefile('rb').read())[1].decode())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, sock], capture_output=True, text=True, user=65534, group=65534,
        cwd=str(ROOT), env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["code"] == 5 and "root only (peer uid 65534)" in answer["msg"]
    assert "supportedVersions" in json.dumps(ask(sock, *VERSION)[1])  # root still is


def test_garbage_and_hostile_frames_get_answers_and_the_agent_stays_up(agent_lab: Lab) -> None:
    sock_path = agent_lab.agent_socket
    frames = [
        b"garbage\n",
        b"\xff\xfe\x00\x01\n",
        b"99999999999 5\n",  # an oversized length prefix: refused before reading
        b"5 99999999999\n",
        b"-1 3\n",
        b"10 10\nshort",  # truncated
        b"x" * 5000,  # a header line longer than allowed, no newline
        encode_request({"CNI_COMMAND": "ADD", "\xff": "x"}, b"{}"),
        b"3 2\nA=\x80{}",  # an env block that is not UTF-8
    ]
    for frame in frames:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(sock_path)
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            reply = sock.makefile("rb").read()
        code, out, _ = decode_reply(reply)
        assert code == 1, frame
        answer = json.loads(out)
        assert isinstance(answer["code"], int) and answer["code"] != 999, (frame, answer)
    assert agent_status(agent_lab)
    assert ask(sock_path, *VERSION)[0] == 0


def test_many_concurrent_and_slow_clients_keep_threads_and_memory_bounded(agent_lab: Lab) -> None:
    lab = agent_lab
    base = agent_status(lab)
    # hundreds of well-formed requests at once: every one answered
    results: list[int] = []

    def one() -> None:
        results.append(ask(lab.agent_socket, *VERSION, timeout=60)[0])

    threads = [threading.Thread(target=one) for _ in range(300)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, agent_status(lab)["threads"])
        time.sleep(0.01)
    assert results == [0] * 300
    assert peak <= base["threads"] + MAX_CLIENTS, (peak, base)

    # slow clients that connect and never finish hold a slot for CLIENT_TIMEOUT at most
    slow = []
    for _ in range(MAX_CLIENTS + 8):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # a full listen backlog: that client waits
            s.connect(lab.agent_socket)
        slow.append(s)
    try:
        start = time.monotonic()
        assert ask(lab.agent_socket, *VERSION, timeout=3 * CLIENT_TIMEOUT)[0] == 0
        assert time.monotonic() - start < 2 * CLIENT_TIMEOUT + 5
        status = agent_status(lab)
        assert status["threads"] <= base["threads"] + MAX_CLIENTS
        assert status["rss_kib"] - base["rss_kib"] < 20 * 1024, (base, status)
    finally:
        for s in slow:
            s.close()


def test_the_socket_directory_is_created_private_and_an_existing_one_left_alone(tmp_path: Path) -> None:
    """--socket in an existing directory (say /run) never changes its mode; a
    directory the agent creates is root only."""
    with Lab() as lab:
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        os.chmod(shared, 0o755)
        own = tmp_path / "new" / "agent"
        procs = []
        for sock in (shared / "a.sock", own / "a.sock"):
            env = {**os.environ, "BWPLUGIN_NO_AGENT": "1"}
            procs.append(
                subprocess.Popen(
                    [
                        "nsenter",
                        f"--net={lab.node}",
                        sys.executable,
                        "-m",
                        "bwplugin.node.agent",
                        "--socket",
                        str(sock),
                    ],
                    env=env,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
        try:
            deadline = time.monotonic() + 20
            while not ((shared / "a.sock").exists() and (own / "a.sock").exists()):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.05)
            assert stat.S_IMODE(shared.stat().st_mode) == 0o755
            assert stat.S_IMODE(own.stat().st_mode) == 0o700
            assert stat.S_IMODE((shared / "a.sock").stat().st_mode) == 0o600
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)


def test_sigterm_during_a_burst_of_adds_finishes_or_fails_cleanly(agent_lab: Lab) -> None:
    """Every ADD in flight when the agent is told to stop either completed (CHECK
    passes) or its caller got an error and nothing of it is left."""
    lab = agent_lab
    pods = [lab.pod(f"p{i}") for i in range(24)]
    conflist = lab.conflist(shaper())
    bpf.programs().close()  # compiled beforehand: the ADDs run side by side, not behind a compile
    outcomes: dict[str, str] = {}

    def add(pod) -> None:
        try:
            lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
            outcomes[pod.name] = "ok"
        except PluginFailed as exc:
            outcomes[pod.name] = f"failed {exc.error and exc.error.get('code')}"

    threads = [threading.Thread(target=add, args=(pod,)) for pod in pods]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not outcomes:  # the first ADD is done, the others under way: stop the agent now
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert lab.agent is not None
    lab.agent.send_signal(signal.SIGTERM)
    finished_before_stop = len(outcomes)
    for t in threads:
        t.join(timeout=120)
    assert lab.agent.wait(timeout=60) == 0
    lab.agent = None
    assert len(outcomes) == len(pods), outcomes
    assert finished_before_stop < len(pods)  # some were in flight when the stop came
    assert set(outcomes.values()) <= {"ok", "failed 11"}, outcomes
    done = [pod for pod in pods if outcomes[pod.name] == "ok"]
    for pod in done:
        pod.attachment.check()  # now in-process: the agent is gone
    # nothing of the failed ones: no ifb but the completed pods', no qdisc on any other veth
    kv = view(lab.node)
    ours = {host_veth(pod) for pod in done}
    assert set(kv.ifbs()) == {ifb_name(conflist["name"], pod.attachment.container_id, "eth0") for pod in done}
    for name, link in kv.links.items():
        if link["kind"] == "veth" and name not in ours:
            assert kv.tbf(name) is None and not kv.has_clsact(name), name


# ---------------------------------------------------------------- the start-up sweep


def orphans(lab: Lab) -> list[str]:
    with Netlink.in_netns(lab.node) as nl:
        return [link.name for link in gc.orphan_ifbs(nl)]


def test_the_sweep_never_deletes_on_missing_evidence(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the agent's start-up sweep would delete, case by case: an ifb is an
    orphan only when no map entry claims it and no filter steers to it."""
    with Lab() as lab:
        pod = lab.pod("a")
        att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=RATE))
        ifb, veth = att.result["interfaces"][-1]["name"], host_veth(pod)
        attach_id = int(view(lab.node).links[ifb]["alias"].split(" id=")[1].split()[0])
        fd = bpf.open_map()
        assert fd is not None
        entry = bpf.attach_get(fd, attach_id)
        assert entry is not None
        try:
            assert orphans(lab) == []  # live

            # the attach map cannot be opened (another pin dir, a layout bump, bpffs remounted)
            with monkeypatch.context() as m:
                m.setenv("BWPLUGIN_PIN_DIR", f"/sys/fs/bpf/bwpt-nothing-{lab.tag}")
                assert orphans(lab) == []

            # an ADD under way: the ifb labelled, its index not yet in the entry, no filter yet
            lab.run(lab.node, "tc", "qdisc", "del", "dev", veth, "clsact")
            bpf.map_update(fd, bpf.attach_key(attach_id), replace(entry, ifb_index=0).pack(), bpf.BPF_EXIST)
            assert orphans(lab) == []

            # filters still steer to it though the map has no entry for it (an older layout's)
            bpf.map_delete(fd, bpf.attach_key(attach_id))
            lab.run(lab.node, "tc", "qdisc", "add", "dev", veth, "clsact")
            prog = bpf.open_pinned()
            assert prog is not None
            with Netlink.in_netns(lab.node) as nl:
                index = nl.link(name=veth).index
                tc.add_bpf_filter(nl, index, tc.CLSACT_INGRESS, prog.fd("bwp_from_pod"), "bwplugin:x", attach_id)
            prog.close()
            assert orphans(lab) == []

            # nothing claims it and nothing steers to it: an orphan
            lab.run(lab.node, "tc", "qdisc", "del", "dev", veth, "clsact")
            assert orphans(lab) == [ifb]
        finally:
            bpf.close_fds(fd)
