"""The node agent: restart safety, crash mid-request, fallback, permissions."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.lab.lab import Lab, Pod
from bench.lab.libcni import (
    PluginFailed,
    plugin_conf,
)
from bwplugin.datapath import bpf
from bwplugin.datapath.naming import parse_alias
from bwplugin.node.agent import decode_request, encode_reply
from bwplugin.node.client import decode_reply, encode_request

from .conftest import bandwidth, host_veth, shaper
from .oracle import after_handover, settled_ifbs, view

pytestmark = pytest.mark.kernel


@pytest.fixture
def agent_lab():
    with Lab(agent=True) as lab:
        yield lab


def test_socket_is_root_only(agent_lab: Lab) -> None:
    sock = agent_lab.agent_socket
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(sock).st_mode)


def test_agent_killed_mid_add_then_restarted_converges(agent_lab: Lab) -> None:
    lab = agent_lab
    pod = lab.pod("a")
    lab.set_fault("after-filter:kill")  # the agent dies inside ADD, after the redirect filter
    with pytest.raises(PluginFailed) as err:
        lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    lab.set_fault(None)
    assert err.value.error["code"] == 11 and "agent failed during ADD" in err.value.error["msg"]
    assert lab.agent is not None and lab.agent.wait(timeout=10) == -9
    lab.agent = None
    assert len(view(lab.node).ifbs()) == 1  # half-made: ifb, map entry, clsact and filters are there
    lab.start_agent()  # restart: nothing was kept in memory
    pod.attachment.delete()  # the runtime's DEL after a failed ADD cleans all of it
    assert settled_ifbs(lab.node) == []
    kv = view(lab.node)
    assert not any(kv.has_clsact(n) for n in kv.links)
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    att.check()


def test_state_survives_agent_restart(agent_lab: Lab) -> None:
    lab = agent_lab
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=10_000_000))
    lab.stop_agent()
    lab.start_agent()
    att.check()
    att.delete()
    pod.attachment = None
    assert settled_ifbs(lab.node) == []


def test_without_agent_the_executable_works_alone(agent_lab: Lab) -> None:
    lab = agent_lab
    lab.stop_agent()
    assert not os.path.exists(lab.agent_socket)  # removed on a clean stop
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=5_000_000, egress=5_000_000))
    att.check()


def test_stale_socket_is_replaced_and_a_live_one_is_not(agent_lab: Lab) -> None:
    lab = agent_lab
    lab.stop_agent(sig=9)  # SIGKILL leaves the socket file behind
    assert os.path.exists(lab.agent_socket)
    pod = lab.pod("a")  # connect is refused: the executable falls back to doing the work
    lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=5_000_000)).check()
    lab.start_agent()  # replaces the stale file
    pod.attachment.check()
    second = subprocess.run(
        ["nsenter", f"--net={lab.node}", sys.executable, "-m", "bwplugin.node.agent", "--socket", lab.agent_socket],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert second.returncode != 0 and "already serving" in second.stderr


def test_malformed_request_gets_an_answer(agent_lab: Lab) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(agent_lab.agent_socket)
        sock.sendall(b"garbage\n")
        sock.shutdown(socket.SHUT_WR)
        code, out, err = decode_reply(sock.makefile("rb").read())
    assert code == 1 and b"malformed request" in err
    answer = json.loads(out)  # a spec error the runtime can read
    assert answer["code"] == 5 and "malformed request" in answer["msg"]


def test_framing_roundtrip_carries_the_cni_protocol_only() -> None:
    """A request's BWPLUGIN_* (or any other) variables never reach the agent's
    settings: they could pick the C source it compiles, where it pins and writes."""
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=1;B=x=y"}
    steer = {"BWPLUGIN_BPF_DIR": "/tmp/evil", "BWPLUGIN_PIN_DIR": "/tmp/pins", "PATH": "/tmp", "LD_PRELOAD": "x"}
    raw = encode_request({**env, **steer}, b'{"a": 1}')
    head, _, rest = raw.partition(b"\n")
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        pos += n
        return rest[pos - n : pos]

    assert decode_request(head, read) == (env, b'{"a": 1}')
    assert decode_reply(encode_reply(7, {"x": 1}, ["l1", "l2"])) == (7, b'{"x": 1}\n', b"l1\nl2\n")


def shaper_dels_at_once(lab: Lab, pods: list[Pod]) -> list[tuple[int, str]]:
    """bwplugin's DEL (alone, as the last plugin of the chain) for every pod at once."""

    def delete(pod: Pod) -> tuple[int, str]:
        att = pod.attachment
        assert att is not None
        inv = lab.exec_shaper("DEL", pod, plugin_conf(att.conflist, shaper(), att.result, att.runtime_config))
        return inv.rc, inv.stdout

    with ThreadPoolExecutor(len(pods)) as pool:
        return list(pool.map(delete, pods))


def test_del_answers_before_the_ifb_is_released_then_releases_it(agent_lab: Lab) -> None:
    """Through the agent, DEL answers once the attachment is inert, and the ifb
    device goes just after. To tell that from a synchronous DEL, 8 DELs run at once:
    right after all have answered, some ifbs must still exist (a synchronous DEL
    would have deleted each before answering), and then all go."""
    lab = agent_lab
    conflist = lab.conflist(shaper())
    pods = [lab.pod(f"d{i}") for i in range(8)]
    for pod in pods:
        lab.attach(pod, conflist, bandwidth(egress=10_000_000))
    veths = [next(i["name"] for i in p.attachment.result["interfaces"] if i["name"].startswith("veth")) for p in pods]

    answers = shaper_dels_at_once(lab, pods)
    kv = view(lab.node)
    assert answers == [(0, "")] * len(pods)
    assert kv.ifbs(), "every ifb was already gone when the DELs answered: nothing was deferred"
    for veth in veths:  # inert at once
        assert kv.filters.get(veth) is None and not kv.has_clsact(veth)
    assert settled_ifbs(lab.node) == []  # and the devices go right after


def test_sigterm_drains_the_ifb_releases_still_pending(agent_lab: Lab) -> None:
    """DEL through the agent answers before the ifb device goes (its deletion waits
    for RCU); SIGTERM must still delete every one pending. 16 concurrent DELs leave
    releases queued behind them; the agent is stopped the moment the last answers."""
    lab = agent_lab
    conflist = lab.conflist(shaper())
    pods = [lab.pod(f"p{i}") for i in range(16)]
    for pod in pods:
        lab.attach(pod, conflist, bandwidth(egress=10_000_000))
        # DEL of an attachment still moving to TCX waits for the move: not this test's subject
        after_handover(lab.node, host_veth(pod, pod.attachment.result), through_agent=True)
    assert len(view(lab.node).ifbs()) == 16

    answers = shaper_dels_at_once(lab, pods)
    pending = view(lab.node).ifbs()
    lab.stop_agent(signal.SIGTERM)
    assert answers == [(0, "")] * len(pods)
    assert pending, "every ifb was gone before SIGTERM: nothing was left to drain"
    assert view(lab.node).ifbs() == [], f"{len(pending)} pending at SIGTERM"
    lab.start_agent()  # for the chains' own DEL at teardown


def test_restarted_agent_sweeps_ifbs_a_crash_left_unreleased(agent_lab: Lab) -> None:
    lab = agent_lab
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=10_000_000))
    ifb = att.result["interfaces"][-1]["name"]
    veth = next(i["name"] for i in att.result["interfaces"] if i["name"].startswith("veth"))
    lab.stop_agent(sig=9)
    # what a DEL leaves if the agent dies before its deferred release: inert, unreleased
    lab.run(lab.node, "tc", "qdisc", "del", "dev", veth, "clsact")
    label = parse_alias(view(lab.node).links[ifb]["alias"])
    fd = bpf.open_map()
    bpf.map_delete(fd, bpf.attach_key(label.attach_id))
    os.close(fd)
    lab.start_agent()
    assert ifb not in view(lab.node).links
    pod.attachment.result = None  # nothing left for the final DEL but ptp's part


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _agent_module(*args: str) -> list[str]:
    """The agent (or its health probe) on the interpreter line the launchers use (-I -S),
    without Debian's dist-packages when asked: then bcc cannot be imported."""
    return [sys.executable, "-I", "-S", "-c",
            f"import sys; sys.path[:0] = [{REPO!r}]; from bwplugin.node.agent import main; "
            "raise SystemExit(main())", *args]  # fmt: skip


def test_health_and_status_agree_on_a_node_that_cannot_shape(tmp_path) -> None:
    """The DaemonSet's probes: an agent whose node lacks kernel headers and bcc
    (and has nothing compiled) is live but not ready, for the same reasons STATUS
    gives (code 50). It runs in a private mount namespace whose /lib/modules/<release>
    is empty, and a network namespace of its own (its start-up sweep sees nothing
    of the node's)."""
    release = os.uname().release
    empty, sock = tmp_path / "empty", tmp_path / "agent" / "agent.sock"
    empty.mkdir()
    env = {"BWPLUGIN_PIN_DIR": str(tmp_path / "pins"), "BWPLUGIN_RUN_DIR": str(tmp_path / "run"),
           "PATH": os.environ["PATH"]}  # fmt: skip
    argv = shlex.join(_agent_module("--socket", str(sock)))
    agent = subprocess.Popen(
        ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
         f"mount --bind {empty} /lib/modules/{release} && exec {argv}"],
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        assert sock.exists(), agent.stderr.read() if agent.poll() is not None else "no socket"
        ready = subprocess.run(
            _agent_module("--health", "ready", "--socket", str(sock)), capture_output=True, text=True
        )
        live = subprocess.run(_agent_module("--health", "live", "--socket", str(sock)), capture_output=True, text=True)
        report = json.loads(ready.stdout)
        assert ready.returncode == 1 and live.returncode == 0, (ready, live)
        assert report["live"] and not report["ready"] and report["watch"] == "off", report
        status = subprocess.run(
            [sys.executable, "-I", "-S", "-c",
             f"import sys; sys.path[:0] = [{REPO!r}]; from bwplugin.node.client import main; raise SystemExit(main())"],
            input='{"cniVersion": "1.1.0", "name": "n", "type": "bwplugin"}', capture_output=True, text=True,
            env={"CNI_COMMAND": "STATUS", "BWPLUGIN_AGENT_SOCKET": str(sock)},
        )  # fmt: skip
        err = json.loads(status.stdout)
        assert status.returncode == 1 and err["code"] == 50, err
        assert report["problems"] and all(p in err["msg"] for p in report["problems"]), (report, err)
        assert f"kernel headers are missing (/lib/modules/{release}/build)" in err["msg"]
    finally:
        agent.terminate()
        agent.wait(30)
    down = subprocess.run(_agent_module("--health", "live", "--socket", str(sock)), capture_output=True, text=True)
    assert down.returncode == 1 and "not live" in down.stderr
