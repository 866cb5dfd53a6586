"""The node agent as the DaemonSet of deploy/daemonset.yaml, in the image that
deploy/build-image.sh builds, under a real, private containerd.

The image is built here from Debian's packages (no registry), imported with
ctr as a node owner imports it, and the manifest's pod is run over CRI as the
kubelet runs it: host namespaces, privileges, commands, env, mounts and exec
probes are read from the manifest (bench/lab/daemonset.py; its hostPaths are
relocated into the lab, see there). No kubelet or API server runs here: the
test plays the kubelet's part (start the pod, run its probes, restart a
crashed container, replace the pod on an image update), and only that.

Pods are then created over CRI with bandwidth annotations: containerd runs the
conflist, whose bwplugin is what the init container installed (the static
forwarder), which hands each request to the containerized agent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.lab.containerd import Containerd, Sandbox
from bench.lab.daemonset import (
    DaemonPod,
    DaemonSetRunner,
    build_image,
    exec_json,
    host_env,
    import_image,
    read_manifest,
)

from .fake_apiserver import FakeAPIServer, pod_object
from .oracle import link_pins
from .test_containerd import node_links, pinned_map_entries, qdiscs
from .test_watch import rate as tbf_rate

pytestmark = pytest.mark.kernel

M = 1_000_000
ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = read_manifest()
IMAGE = TEMPLATE.containers[0].image  # registry.example/bwplugin:0.1.0
UPGRADE = IMAGE.rsplit(":", 1)[0] + ":0.1.1-bwpt"
ANNOTATED = {"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"}


@dataclass(frozen=True)
class Images:
    current: Path  # built from this checkout
    upgrade: Path  # the same, with a changed eBPF source


def _source_copy(dest: Path) -> Path:
    """This checkout's files (no venv, caches or git), with the eBPF C changed."""
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".*_cache", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT, dest, ignore=ignore)
    with open(dest / "bpf" / "bwplugin.c", "a") as fh:
        fh.write("/* bwpt: a newer build of the programs */\n")
    return dest


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    work = Path(tempfile.mkdtemp(prefix="bwpt-image-"))
    try:
        cache = work / "cache"  # the Debian layer is built once for both
        current = build_image(work / "bwplugin.oci.tar", IMAGE.rsplit(":", 1)[1], cache)
        upgrade = build_image(work / "upgrade.oci.tar", UPGRADE.rsplit(":", 1)[1], cache, _source_copy(work / "src"))
        yield Images(current, upgrade)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Node:
    ctrd: Containerd
    runner: DaemonSetRunner
    pod: DaemonPod

    @property
    def pins(self) -> Path:
        return self.runner.paths.bpffs / "bwplugin"

    def cni_bin(self) -> Path:
        return self.ctrd.dir / "bin" / "bwplugin"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The package copy's bwplugin-cli on the node, as a person runs it there."""
        exe = self.runner.paths.root / "opt/bwplugin/lib/bwplugin-cli"
        return subprocess.run(
            ["nsenter", f"--net={self.ctrd.node}", str(exe), *args],
            capture_output=True, text=True, env=host_env(self.runner), timeout=60,
        )  # fmt: skip


@pytest.fixture
def node(images: Images) -> Iterator[Node]:
    with Containerd(external_agent=True, installer=lambda _bin: None) as c:
        import_image(c, images.current, IMAGE)
        runner = DaemonSetRunner(c, TEMPLATE, f"{c.name}-node")
        try:
            yield Node(c, runner, runner.start())
            for sandbox in list(c.sandboxes.values()):  # pods go before the agent, as on a drained node
                c.remove_pod(sandbox)
        finally:
            runner.close()


def assert_no_pod_state(n: Node) -> None:
    """Only the DaemonSet's own pod runs; no veth, ifb, map entry, link or IP is left."""
    assert set(node_links(n.ctrd)) == {"lo"}, node_links(n.ctrd)
    for name in ("attach_v3", "subnets_v3", "pods_v3", "shaping_v3", "tcx_v3"):
        assert pinned_map_entries(n.pins, name) == [], name
    assert link_pins(str(n.pins)) == []
    assert n.ctrd.cri is not None and n.ctrd.cri.list_pods() == [n.pod.sandbox]
    ipam = n.ctrd.dir / "ipam" / "bwpt-pods"
    assert not ipam.exists() or [p.name for p in ipam.iterdir() if p.name[0].isdigit()] == []


def assert_shaped(n: Node, pod: Sandbox, ingress: int, egress: int) -> None:
    """The rates read back with tc, and UDP goodput at the receiver within 5 %."""
    veth = n.ctrd.host_veth(pod)
    ifb = n.ctrd.ifb_of(veth)
    assert ifb, f"no ifb steered from {veth}"
    for dev, rate in ((veth, ingress), (ifb, egress)):
        (root,) = [q for q in qdiscs(n.ctrd, dev) if q.get("root")]
        assert root["kind"] == "tbf" and int(root["options"]["rate"]) * 8 == rate, root
    for direction, rate in (("ingress", ingress), ("egress", egress)):
        t = n.ctrd.iperf(pod, direction, seconds=2, udp=2 * rate)
        assert 0.95 <= t.goodput / rate <= 1.05, (direction, t)


def is_static_elf(path: Path) -> bool:
    """No PT_INTERP program header: the binary needs no dynamic loader or libc."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


def run_cni(exe: Path, command: str, conf: dict, env: dict[str, str], root: Path | None = None) -> tuple[int, dict]:
    """The CNI executable as a runtime execs it (optionally inside a chroot)."""
    argv = [shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/bwplugin"] if root else [str(exe)]
    proc = subprocess.run(
        argv, input=json.dumps(conf), capture_output=True, text=True, timeout=60,
        env={**env, "CNI_COMMAND": command, "CNI_PATH": str(exe.parent)},
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def plugin_conf(n: Node) -> dict:
    doc = json.loads((n.ctrd.dir / "net.d" / "10-bwpt.conflist").read_text())
    return {**doc["plugins"][1], "name": doc["name"], "cniVersion": "1.1.0"}


# ---------------------------------------------------------------- the tests


def test_the_manifest_installs_the_forwarder_and_serves_the_agent(node: Node) -> None:
    n = node
    assert "installed /host/opt/cni/bin/bwplugin (the forwarder" in n.pod.init_logs["install-cni"]
    assert is_static_elf(n.cni_bin())  # runs on a node without Python (and without glibc)
    copy = n.runner.paths.root / "opt/bwplugin/lib"
    assert (copy / "bwplugin" / "node" / "agent.py").exists() and (copy / "bpf" / "bwplugin.c").exists()
    assert (copy / "bwplugin-cli").read_text().startswith("#!/usr/bin/python3 -IS")
    socket_path = n.runner.paths.root / "run/bwplugin/agent.sock"
    assert socket_path.is_socket() and (socket_path.stat().st_mode & 0o777) == 0o600
    for kind in ("readiness", "liveness"):
        code, out = n.runner.probe(n.pod, kind)
        report = json.loads(out.splitlines()[0])
        assert code == 0 and report["live"] and report["ready"] and report["problems"] == [], (kind, out)
        assert report["watch"] == "running"  # the manifest's --watch-pods (no API server here: it retries)
    env = {"BWPLUGIN_AGENT_SOCKET": str(socket_path), "PATH": os.environ["PATH"]}
    assert run_cni(n.cni_bin(), "STATUS", plugin_conf(n), env) == (0, {})
    code, version = run_cni(n.cni_bin(), "VERSION", plugin_conf(n), env)
    assert code == 0 and "1.1.0" in version["supportedVersions"], version


def test_annotated_pods_are_shaped_through_the_containerized_agent(node: Node) -> None:
    n = node
    web = n.ctrd.run_pod("web", ANNOTATED, namespace="team-a")
    batch = n.ctrd.run_pod("batch", {"kubernetes.io/egress-bandwidth": "5M"}, namespace="team-b")
    assert_shaped(n, web, 10 * M, 20 * M)
    batch_veth = n.ctrd.host_veth(batch)
    assert [q["kind"] for q in qdiscs(n.ctrd, batch_veth) if q.get("root")] != ["tbf"]  # egress only
    t = n.ctrd.iperf(batch, "egress", seconds=2, udp=10 * M)
    assert 0.95 <= t.goodput / (5 * M) <= 1.05, t

    out = n.cli("stats", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["pod"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"web", "batch"}, rows
    assert (rows["web"]["namespace"], rows["web"]["container_id"]) == ("team-a", web.id)
    assert rows["web"]["egress"]["shaped_bytes"] > 0 and rows["batch"]["egress"]["shaped_bytes"] > 0
    assert rows["batch"]["ingress"]["queue"] is None and rows["batch"]["egress"]["queue"]["rate_bps"] == 5 * M
    inside = {r["pod"]: r for r in exec_json(n.runner, n.pod, "bwplugin", "stats", "--json")}  # kubectl exec
    assert set(inside) == {"web", "batch"} and inside["web"]["host_veth"] == n.ctrd.host_veth(web), inside
    check = n.ctrd.cni_check(web)  # CHECK through the forwarder, as libcni runs it
    assert check.returncode == 0, check.stdout + check.stderr
    for pod in (web, batch):
        n.ctrd.remove_pod(pod)
    assert_no_pod_state(n)


def _restart_agent(n: Node, attempt: int) -> None:
    n.runner.restart(n.pod, "agent", attempt)
    n.runner.wait_ready(n.pod, 60)


def test_agent_killed_and_restarted_during_pod_churn_loses_nothing(node: Node) -> None:
    """Pods come and go while the agent container is killed and the kubelet
    restarts it: each pod is shaped (those started in the outage wait in the
    forwarder for the new agent) or cleanly failed, and nothing is left."""
    n = node
    done = threading.Event()
    outcomes: list[tuple[str, str, float]] = []  # (outcome, pod, when its RunPodSandbox began)
    leftovers: list[Sandbox] = []

    def churn() -> None:
        i = 0
        while not done.is_set():
            name, began = f"churn-{i}", time.monotonic()
            i += 1
            try:
                pod = n.ctrd.run_pod(name, {"kubernetes.io/egress-bandwidth": "8M"})
            except Exception as exc:  # a clean failure: the runtime retries a new sandbox
                outcomes.append((f"failed: {exc}", name, began))
                continue
            try:
                veth = n.ctrd.host_veth(pod)
                ifb = n.ctrd.ifb_of(veth)
                roots = [q["kind"] for q in qdiscs(n.ctrd, ifb) if q.get("root")] if ifb else []
                outcomes.append(("shaped" if roots == ["tbf"] else f"unshaped {veth} {ifb} {roots}", name, began))
            finally:
                try:
                    n.ctrd.remove_pod(pod)
                except Exception:  # the kubelet retries StopPodSandbox: so does the test, after the churn
                    leftovers.append(pod)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        time.sleep(3)
        killed = time.monotonic()
        os.kill(n.runner.pid(n.pod), signal.SIGKILL)  # a crash (or the OOM killer)
        time.sleep(2)
        _restart_agent(n, 1)
        ready = time.monotonic()
        time.sleep(3)
    finally:
        done.set()
        thread.join(120)
    for pod in leftovers:
        n.ctrd.remove_pod(pod)
    bad = [o for o in outcomes if o[0] != "shaped" and not o[0].startswith("failed")]
    assert not bad, bad
    assert sum(o[0] == "shaped" for o in outcomes) >= 4, outcomes
    in_outage = [o for o in outcomes if killed + 0.1 < o[2] < ready]
    assert in_outage and all(o[0] == "shaped" for o in in_outage), (killed, ready, outcomes)
    assert_no_pod_state(n)


def test_an_image_upgrade_keeps_running_pods_shaped_and_their_counters(node: Node, images: Images) -> None:
    n = node
    old = n.ctrd.run_pod("long-lived", ANNOTATED)
    n.ctrd.iperf(old, "egress", seconds=1, udp=40 * M)
    (before,) = json.loads(n.cli("stats", "--json").stdout)
    programs_before = {p.name for p in n.pins.iterdir() if p.name.startswith("bwp_from_pod_")}

    # the DaemonSet's RollingUpdate: the old pod goes (SIGTERM, grace), the new image's comes
    import_image(n.ctrd, images.upgrade, UPGRADE)
    n.runner.stop(n.pod)
    n.pod = n.runner.start(UPGRADE)
    new = n.ctrd.run_pod("after-upgrade", ANNOTATED)
    programs_after = {p.name for p in n.pins.iterdir() if p.name.startswith("bwp_from_pod_")}
    assert programs_after and not programs_after & programs_before, (programs_before, programs_after)

    assert_shaped(n, old, 10 * M, 20 * M)  # the old pod keeps its programs and qdiscs
    assert_shaped(n, new, 10 * M, 20 * M)
    rows = {r["pod"]: r for r in json.loads(n.cli("stats", "--json").stdout)}
    assert rows["long-lived"]["egress"]["shaped_bytes"] > before["egress"]["shaped_bytes"] + 20 * M // 8
    assert rows["long-lived"]["container_id"] == before["container_id"]
    for pod in (old, new):
        check = n.ctrd.cni_check(pod)
        assert check.returncode == 0, check.stdout + check.stderr
        n.ctrd.remove_pod(pod)
    assert_no_pod_state(n)


def test_the_forwarder_runs_in_a_root_filesystem_without_python(node: Node) -> None:
    """A node OS with no Python (Bottlerocket, Talos, Flatcar): a root filesystem
    holding only the installed executable and the agent's socket directory."""
    n = node
    pod = n.ctrd.run_pod("web", ANNOTATED)
    rootfs = n.ctrd.dir / "no-python-root"
    (rootfs / "run/bwplugin").mkdir(parents=True)
    shutil.copy2(n.cni_bin(), rootfs / "bwplugin")
    assert not list(rootfs.rglob("python*"))
    sock_dir = n.runner.paths.root / "run/bwplugin"
    subprocess.run(["mount", "--bind", str(sock_dir), str(rootfs / "run/bwplugin")], check=True)
    try:
        cache = n.ctrd.cached_result(pod)
        conf = {**plugin_conf(n), "cniVersion": "1.0.0", "prevResult": cache["result"],
                "runtimeConfig": {"bandwidth": cache["capabilityArgs"]["bandwidth"]}}  # fmt: skip
        env = {"CNI_CONTAINERID": pod.id, "CNI_NETNS": pod.netns, "CNI_IFNAME": "eth0"}
        assert run_cni(n.cni_bin(), "CHECK", conf, env, root=rootfs) == (0, {})
        assert run_cni(n.cni_bin(), "STATUS", {**conf, "cniVersion": "1.1.0"}, env, root=rootfs) == (0, {})
        # real damage is still found: the pod's ifb is gone
        ifb = n.ctrd.ifb_of(n.ctrd.host_veth(pod))
        n.ctrd.in_node("ip", "link", "del", ifb)
        code, err = run_cni(n.cni_bin(), "CHECK", conf, env, root=rootfs)
        assert code == 1 and err["code"] == 102 and ifb in err["msg"], err
    finally:
        subprocess.run(["umount", str(rootfs / "run/bwplugin")], check=False)
    n.ctrd.remove_pod(pod)
    assert_no_pod_state(n)


def test_with_the_agent_down_status_and_the_probes_agree(node: Node) -> None:
    n = node
    conf = plugin_conf(n)
    env = {"BWPLUGIN_AGENT_SOCKET": str(n.runner.paths.root / "run/bwplugin/agent.sock")}
    os.kill(n.runner.pid(n.pod), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while n.runner.probe(n.pod, "liveness")[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    (live, live_out), (ready, ready_out) = n.runner.probe(n.pod, "liveness"), n.runner.probe(n.pod, "readiness")
    assert live != 0 and ready != 0, (live_out, ready_out)
    code, err = run_cni(n.cni_bin(), "STATUS", conf, env)
    assert code == 1 and err["code"] == 50 and "not reachable" in err["msg"], err
    started = time.monotonic()
    code, err = run_cni(n.cni_bin(), "VERSION", conf, env)  # answers at once, without waiting
    assert code == 1 and err["code"] == 11 and time.monotonic() - started < 2, err
    _restart_agent(n, 1)
    assert run_cni(n.cni_bin(), "STATUS", conf, env) == (0, {})
    assert n.runner.probe(n.pod, "readiness")[0] == 0


def test_the_annotation_watch_runs_in_the_container_on_in_cluster_config(images: Images) -> None:
    """The manifest's --watch-pods, in the image, on what the kubelet gives a pod
    of a ServiceAccount: KUBERNETES_SERVICE_HOST/PORT and the mounted token and
    CA. No API server can run here: tests/fake_apiserver.py stands in (HTTPS
    with a certificate for 127.0.0.1), serving real Pod objects."""
    with Containerd(external_agent=True, installer=lambda _bin: None) as c, \
            FakeAPIServer(c.node, tls_dir=c.dir / "apiserver") as api:  # fmt: skip
        import_image(c, images.current, IMAGE)
        node_name = f"{c.name}-node"
        runner = DaemonSetRunner(c, TEMPLATE, node_name)
        runner.extra_env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
        sa = api.service_account(c.dir / "serviceaccount")
        runner.extra_mounts = [(str(sa), "/var/run/secrets/kubernetes.io/serviceaccount")]
        try:
            runner.start()
            n = Node(c, runner, runner.pods[0])
            web = c.run_pod("web", {"kubernetes.io/egress-bandwidth": "10M"}, namespace="team-a")
            ifb = c.ifb_of(c.host_veth(web))
            api.put(pod_object("team-a", "web", web.uid, node_name, {"kubernetes.io/egress-bandwidth": "10M"}))
            api.put(pod_object("team-a", "web", web.uid, node_name, {"kubernetes.io/egress-bandwidth": "30M"}))
            deadline = time.monotonic() + 2  # the bound for applying a changed annotation
            while tbf_rate(c, ifb) != 30 * M and time.monotonic() < deadline:
                time.sleep(0.02)
            assert tbf_rate(c, ifb) == 30 * M, runner.logs(n.pod)[-3000:]
            # the mounted token, read by the client (the scheme's case does not matter, RFC 7235)
            assert f"bearer {api.TOKEN}" in [a.lower() for a in api.authorizations], api.authorizations
            t = c.iperf(web, "egress", seconds=2, udp=60 * M)
            assert 0.95 <= t.goodput / (30 * M) <= 1.05, t
            c.remove_pod(web)
            assert_no_pod_state(n)
        finally:
            runner.close()
