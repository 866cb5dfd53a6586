"""A private, real containerd (Debian's, with its built-in CRI plugin) for the
tests, the demo and the benchmarks.

Everything it owns is named bwpt-<tag>: its config, root, state and socket live
in one temporary directory; it runs inside its own network namespace (the
"node"), so ptp's host veths, bwplugin's ifbs and the node's sysctls stay out of
the real host; pods get private test addresses; cgroups sit under bwpt-<tag>.
Leaving the context stops every sandbox and process and removes all of it, even
after a failure. Two paths outside its directory are fixed in containerd 1.6:
/run/containerd/s/<hash> (the shims' sockets, which go with the shims) and
libcni's result cache /var/lib/cni/results/<network>-<id>-<ifname> (removed by
DEL); directories this lab had to create for them it removes again, if empty.

Pods are created over the CRI gRPC API with Kubernetes annotations, exactly as
the kubelet would; containerd runs the conflist through its own libcni."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bwplugin.node.install import install

from .cri import CRIClient, Sandbox
from .lab import NETNS_DIR, PREFIX, REFERENCE_DIR

PAUSE_IMAGE = "bwpt.local/pause:1"
LAB_DIR = Path(__file__).resolve().parent
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUN_CONTAINERD = "/run/containerd"
CNI_CACHE = "/var/lib/cni"  # libcni's result cache; containerd 1.6 has no setting for it
HOST_ROOT = "host"  # under the lab's directory: the node's relocated hostPaths


class LabError(RuntimeError):
    """The lab itself failed (containerd did not start, a tool is missing)."""


def sh(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


# ---------------------------------------------------------------- the pause image


def build_pause_image(workdir: Path) -> Path:
    """An OCI image archive holding a static /pause, built here from pause.c: no
    registry is needed (or reachable). Returns the archive's path."""
    binary = workdir / "pause"
    sh("gcc", "-static", "-Os", "-s", "-o", str(binary), str(LAB_DIR / "pause.c"))
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        with open(binary, "rb") as fh:
            tar.addfile(info, fh)
    layer_bytes = layer.getvalue()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_bytes)]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config_bytes),
        "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar", layer_bytes)],
    }
    manifest_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **_descriptor("application/vnd.oci.image.manifest.v1+json", manifest_bytes),
                "annotations": {"io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    archive = workdir / "pause.oci.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (
            ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            ("index.json", json.dumps(index).encode()),
            *((f"blobs/sha256/{_digest(b)[7:]}", b) for b in (layer_bytes, config_bytes, manifest_bytes)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}


# ---------------------------------------------------------------- conflists


def conflist(shaper: dict[str, Any] | None, ipam_dir: Path, subnet: str, name: str = "bwpt-pods") -> dict[str, Any]:
    """ptp + host-local, then the shaper (bwplugin or the reference), as a node's
    /etc/cni/net.d would hold it. No ipMasq: nothing touches iptables."""
    ptp = {
        "type": "ptp",
        "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(ipam_dir), "routes": [{"dst": "0.0.0.0/0"}]},
    }
    return {"cniVersion": "1.0.0", "name": name, "plugins": [ptp, *([shaper] if shaper else [])]}


def bwplugin_conf(**extra: Any) -> dict[str, Any]:
    return {"type": "bwplugin", "capabilities": {"bandwidth": True}, **extra}


def reference_conf() -> dict[str, Any]:
    return {"type": "bandwidth", "capabilities": {"bandwidth": True}}


# ---------------------------------------------------------------- containerd


@dataclass(frozen=True)
class Traffic:
    goodput: float  # bits/s the receiver got, over the whole flow
    wire: float  # bits/s the shaping qdisc sent from the first byte to the last (0: no qdisc)
    first_second: float  # bits/s the shaping qdisc sent in the flow's first second
    seconds: float
    device: str  # the device whose root qdisc shaped this direction ("" if none)
    retransmits: int = 0  # TCP segments the sender sent again (iperf3's count; 0 for UDP)


def _wire(samples: list[tuple[float, int]], span: float | None) -> float:
    """Bits/s the qdisc sent. span=None: the steady rate, over the whole 100 ms
    intervals between the first and the last in which bytes moved (the partial
    ones at either end are left out). span=s: over the first s seconds, from the
    last sample before any byte moved (so nothing of an initial burst is missed)."""
    moving = [i for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1]]
    if len(moving) < 3:
        return 0.0
    if span is None:
        (t0, b0), (t1, b1) = samples[moving[0]], samples[moving[-2]]
    else:
        t0, b0 = samples[moving[0] - 1]
        t1, b1 = min(samples, key=lambda s: abs(s[0] - (t0 + span)))
    return (b1 - b0) * 8 / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class Containerd:
    """A private containerd. `shaper`: the conflist's second plugin; `agent`: also
    run bwplugin's node agent (in the node namespace, on a private socket)."""

    shaper: dict[str, Any] | None = field(default_factory=bwplugin_conf)
    agent: bool = False
    subnet: str = "10.236.0.0/24"
    pins: str | None = None  # bwplugin's bpffs pin dir (default: a private one, removed at the end)
    # puts the bwplugin executable into a CNI bin dir (default: bwplugin-install from this checkout)
    installer: Callable[[Path], object] = install
    agent_args: tuple[str, ...] = ()  # more arguments for the agent (--metrics-address, --watch-pods, ...)
    # the agent runs elsewhere (the DaemonSet's container): plugins dial its socket
    # where the lab relocates the node's /run/bwplugin (HOST_ROOT, see daemonset.py)
    external_agent: bool = False

    def __post_init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.name = f"{PREFIX}-{self.tag}"
        self.node = f"{NETNS_DIR}/{self.name}-node"
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent_proc: subprocess.Popen[bytes] | None = None
        self.sandboxes: dict[str, Sandbox] = {}
        self.created: list[str] = []  # every sandbox id this lab made (for the result cache)
        self.cri: CRIClient | None = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Containerd:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-ctrd-"))
        try:
            self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _setup(self) -> None:
        for sub in ("bin", "net.d", "root", "state", "ipam", "logs", "opt", "run"):
            (self.dir / sub).mkdir()
        self.socket = str(self.dir / "containerd.sock")
        self.agent_socket = str(self.dir / "agent" / "agent.sock")
        if self.external_agent:
            self.agent_socket = str(self.dir / HOST_ROOT / "run" / "bwplugin" / "agent.sock")
        for plugin in ("ptp", "host-local", "loopback", "bandwidth"):
            os.symlink(f"{REFERENCE_DIR}/{plugin}", self.dir / "bin" / plugin)
        self.installer(self.dir / "bin")  # the executable a node gets from bwplugin-install
        # containerd 1.6 puts its shims' sockets under /run/containerd/s whatever its
        # config says: if this run creates that directory, it removes it (if empty)
        self.made_dirs = [d for d in (RUN_CONTAINERD, CNI_CACHE) if not os.path.exists(d)]
        self.own_pins = self.pins is None
        if self.pins is None:
            self.pins = f"/sys/fs/bpf/{self.name}"
        sh("ip", "netns", "add", f"{self.name}-node")
        self.in_node("ip", "link", "set", "lo", "up")
        self.write_conflist(self.shaper)
        (self.dir / "config.toml").write_text(self._config())
        self.start()
        image = build_pause_image(self.dir)
        self.ctr("images", "import", "--no-unpack=false", str(image))
        if self.agent:
            self.start_agent()

    def env(self) -> dict[str, str]:
        """containerd's environment, which libcni hands on to every plugin: the
        node's bwplugin settings (private pins and run dir, the agent's socket)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BWPLUGIN_", "CNI_"))}
        env.update(BWPLUGIN_PIN_DIR=str(self.pins), BWPLUGIN_RUN_DIR=str(self.dir / "run"))
        if self.agent or self.external_agent:
            env["BWPLUGIN_AGENT_SOCKET"] = self.agent_socket
        else:
            env["BWPLUGIN_NO_AGENT"] = "1"  # never the machine's agent by accident
        return env

    def _config(self) -> str:
        d = self.dir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # never ask for an oom_score_adj below containerd's own (this VM forbids lowering it)
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  Root = "{d}/runc"
[{cri}.cni]
  bin_dir = "{d}/bin"
  conf_dir = "{d}/net.d"
  max_conf_num = 1
"""

    def write_conflist(self, shaper: dict[str, Any] | None) -> None:
        """containerd's CNI config watcher picks a new file up within a second."""
        doc = conflist(shaper, self.dir / "ipam", self.subnet)
        tmp = self.dir / "net.d" / ".10-bwpt.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.dir / "net.d" / "10-bwpt.conflist")
        self.shaper = shaper

    def start(self) -> None:
        log = open(self.dir / "containerd.log", "ab")  # noqa: SIM115 (owned by the process)
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.node}", "containerd", "--config", str(self.dir / "config.toml")],
            stdout=log, stderr=log, env=self.env(), start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"containerd did not start: {self.log_tail()}")
            if os.path.exists(self.socket):
                client = CRIClient(self.socket, timeout=5)
                try:
                    client.version()
                except Exception:  # not serving CRI yet
                    client.close()
                else:
                    client.timeout = 120
                    self.cri = client
                    break
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.cri is not None:
            self.cri.close()
            self.cri = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.dir / "containerd.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------ the agent

    def start_agent(self) -> None:
        """bwplugin's node agent, in the node namespace (it must share the host
        netns with the veths), with containerd's bwplugin settings."""
        env = self.env()
        log = open(self.dir / "agent.log", "ab")  # noqa: SIM115
        python = os.path.realpath(os.environ.get("BWPLUGIN_PYTHON", shutil.which("python3") or "python3"))
        self.agent_proc = subprocess.Popen(
            ["nsenter", f"--net={self.node}", python, "-m", "bwplugin.node.agent", "--socket", self.agent_socket,
             *self.agent_args],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while not os.path.exists(self.agent_socket):
            if self.agent_proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"agent did not start: {(self.dir / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def stop_agent(self) -> None:
        if self.agent_proc is not None:
            if self.agent_proc.poll() is None:
                self.agent_proc.terminate()
            self.agent_proc.wait(timeout=30)
            self.agent_proc = None

    # ------------------------------------------------------------ pods

    def run_pod(self, name: str, annotations: dict[str, str] | None = None, namespace: str = "bwpt-ns") -> Sandbox:
        """RunPodSandbox as the kubelet sends it, with the pod's annotations."""
        assert self.cri is not None
        uid = f"{self.tag}-{secrets.token_hex(8)}"
        sid = self.cri.run_pod(
            name, namespace, uid, annotations or {}, str(self.dir / "logs" / name), cgroup_parent=f"/{self.name}"
        )
        sandbox = self.cri.sandbox(sid)
        self.sandboxes[sid] = sandbox
        self.created.append(sid)
        return sandbox

    def remove_pod(self, sandbox: Sandbox) -> None:
        """StopPodSandbox then RemovePodSandbox, as the kubelet does."""
        assert self.cri is not None
        self.cri.stop_pod(sandbox.id)
        self.cri.remove_pod(sandbox.id)
        self.sandboxes.pop(sandbox.id, None)

    # ------------------------------------------------------------ running things

    def in_node(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net={self.node}", *argv, timeout=timeout)

    def in_pod(self, sandbox: Sandbox, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net={sandbox.netns}", *argv, timeout=timeout)

    def ctr(self, *argv: str) -> str:
        return sh("ctr", "--address", self.socket, "--namespace", "k8s.io", *argv).stdout

    def host_veth(self, sandbox: Sandbox) -> str:
        """The pod's host-side veth, read with iproute2 (not bwplugin's code): the
        peer ifindex of the pod's eth0, looked up in the node namespace."""
        pod_link = json.loads(self.in_pod(sandbox, "ip", "-j", "link", "show", "eth0").stdout)[0]
        peer = int(pod_link["link_index"])
        for link in json.loads(self.in_node("ip", "-j", "link", "show").stdout):
            if int(link["ifindex"]) == peer:
                return str(link["ifname"])
        raise LabError(f"no host veth with ifindex {peer} for {sandbox.name}")

    def gateway(self, sandbox: Sandbox) -> str:
        """The node-side address ptp gave the pod's veth (the pod's default route)."""
        routes = json.loads(self.in_pod(sandbox, "ip", "-j", "-4", "route", "show", "default").stdout)
        return str(routes[0]["gateway"])

    def cached_result(self, sandbox: Sandbox, ifname: str = "eth0") -> dict[str, Any]:
        """What containerd's libcni cached at ADD: the config and runtimeConfig it
        sent, and the chain's result (libcni's CHECK and DEL send that back)."""
        path = Path(CNI_CACHE) / "results" / f"bwpt-pods-{sandbox.id}-{ifname}"
        return dict(json.loads(path.read_text()))

    def bwplugin(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """The installed executable, run as a person on the node runs it (`bwplugin
        stats`, `bwplugin set`): in the node's network namespace, with its settings."""
        return subprocess.run(
            ["nsenter", f"--net={self.node}", str(self.dir / "bin" / "bwplugin"), *args],
            capture_output=True, text=True, env=self.env(), check=check, timeout=120,
        )  # fmt: skip

    def cni_check(self, sandbox: Sandbox, ifname: str = "eth0") -> subprocess.CompletedProcess[str]:
        """CHECK as libcni runs it for the last plugin of the chain: its own config
        with the list's name and version, the runtimeConfig and the cached final
        result, all from containerd's cache (containerd 1.6's CRI never calls CHECK)."""
        cache = self.cached_result(sandbox, ifname)
        conflist = json.loads(base64.b64decode(cache["config"]))
        conf = {
            **conflist["plugins"][1],
            "name": conflist["name"],
            "cniVersion": conflist["cniVersion"],
            "runtimeConfig": {"bandwidth": cache["capabilityArgs"]["bandwidth"]},
            "prevResult": cache["result"],
        }
        env = {
            **self.env(),
            "CNI_COMMAND": "CHECK",
            "CNI_CONTAINERID": sandbox.id,
            "CNI_NETNS": sandbox.netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": ";".join(f"{k}={v}" for k, v in cache.get("cniArgs") or []),
            "CNI_PATH": str(self.dir / "bin"),
        }
        return subprocess.run(
            ["nsenter", f"--net={self.node}", str(self.dir / "bin" / "bwplugin")],
            input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip

    def qdisc_bytes(self, dev: str) -> int:
        """Bytes the root qdisc of a node-side device sent, read with tc -j."""
        for q in json.loads(self.in_node("tc", "-s", "-j", "qdisc", "show", "dev", dev, "root").stdout):
            return int(q.get("bytes", 0))
        return 0

    def iperf(self, sandbox: Sandbox, direction: str, seconds: float = 3, port: int = 5201, udp: int = 0) -> Traffic:
        """One iperf3 flow between the pod and the node, from its first packet (no
        omitted warm-up). egress: the pod sends; ingress: the node sends to the pod.
        Meanwhile the shaping qdisc's sent bytes are sampled with tc every 100 ms."""
        gateway = self.gateway(sandbox)
        veth = self.host_veth(sandbox)
        dev = veth if direction == "ingress" else self.ifb_of(veth)
        server = subprocess.Popen(
            ["nsenter", f"--net={self.node}", "iperf3", "-s", "-1", "-B", gateway, "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not self.in_node("ss", "-Hltn", f"sport = :{port}").stdout.strip():
                if time.monotonic() > deadline:
                    raise LabError("iperf3 server did not listen")
                time.sleep(0.05)
            argv = ["iperf3", "-c", gateway, "-p", str(port), "-t", str(seconds), "-O", "0", "-J"]
            argv += ["-R"] if direction == "ingress" else []
            argv += ["-u", "-b", str(udp), "-l", "1400"] if udp else []
            samples = [(time.monotonic(), self.qdisc_bytes(dev) if dev else 0)]
            client = subprocess.Popen(
                ["nsenter", f"--net={sandbox.netns}", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            while client.poll() is None:
                time.sleep(0.1)
                samples.append((time.monotonic(), self.qdisc_bytes(dev) if dev else 0))
            out, err = client.communicate()
            if client.returncode != 0:
                raise LabError(f"iperf3 failed: {out.decode()[-500:]} {err.decode()[-500:]}")
        finally:
            server.kill()
            server.wait()
        end = json.loads(out)["end"]
        summary = end["sum"] if udp else end["sum_received"]
        goodput = float(summary["bits_per_second"]) * (1 - float(summary.get("lost_percent", 0)) / 100)
        retransmits = 0 if udp else int(end.get("sum_sent", {}).get("retransmits", 0))
        return Traffic(goodput, _wire(samples, None), _wire(samples, 1.0), float(summary["seconds"]), dev, retransmits)

    def ifb_of(self, veth: str) -> str:
        """The ifb the pod's egress is steered to ("" if none), read with iproute2:
        the reference names it in its act_mirred filter; bwplugin redirects from
        eBPF and records the host veth's ifindex in the ifb's alias."""
        filters = self.in_node("tc", "filter", "show", "dev", veth, "ingress").stdout
        index = int(json.loads(self.in_node("ip", "-j", "link", "show", veth).stdout)[0]["ifindex"])
        for link in json.loads(self.in_node("ip", "-j", "-d", "link", "show").stdout):
            if link.get("linkinfo", {}).get("info_kind") != "ifb":
                continue
            name, alias = str(link["ifname"]), str(link.get("ifalias", ""))
            if f"Redirect to device {name})" in filters or f" host={index} " in alias:
                return name
        return ""

    # ------------------------------------------------------------ teardown

    def __exit__(self, *exc: object) -> None:
        errors: list[str] = []
        if self.cri is not None:
            for sid in list(self.sandboxes):
                try:
                    self.cri.stop_pod(sid)
                    self.cri.remove_pod(sid)
                except Exception as err:  # keep going: the rest must still go
                    errors.append(f"sandbox {sid[:12]}: {err}")
                self.sandboxes.pop(sid, None)
        self.stop()
        self.stop_agent()
        self._kill_strays()
        self._unmount_all()
        if os.path.exists(self.node):
            sh("ip", "netns", "del", f"{self.name}-node", check=False)
        self._remove_cgroups()
        if getattr(self, "own_pins", False) and self.pins and os.path.isdir(self.pins):
            for pin in Path(self.pins).iterdir():
                pin.unlink()
            os.rmdir(self.pins)
        shutil.rmtree(self.dir, ignore_errors=True)
        # libcni's cached results of our own sandboxes (our network's and containerd's
        # loopback), which a DEL that failed (a test that failed with its agent down,
        # say) leaves behind: ours by the sandbox id, which only this containerd made
        for sid in self.created:
            for cached in Path(CNI_CACHE, "results").glob(f"*-{sid}-*"):
                cached.unlink(missing_ok=True)
        for made in getattr(self, "made_dirs", []):
            for d in sorted(Path(made).glob("*"), reverse=True) + [Path(made)]:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty: another runtime may use it by now
        if errors and exc[0] is None:
            raise LabError("teardown: " + "; ".join(errors))

    def _kill_strays(self) -> None:
        """Shims and pause processes of this containerd that outlived it: shims by
        the socket they were given, pods by the cgroup they were put in."""
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
                cgroups = (pid_dir / "cgroup").read_text()
            except OSError:
                continue
            if str(self.dir).encode() in cmdline or f"/{self.name}/" in cgroups:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)

    def _unmount_all(self) -> None:
        with open("/proc/self/mounts") as fh:
            points = [line.split()[1] for line in fh]
        for point in sorted((p for p in points if p.startswith(str(self.dir))), key=len, reverse=True):
            sh("umount", "-l", point, check=False)

    def _remove_cgroups(self) -> None:
        for parent in CGROUP_ROOT.glob(f"*/{self.name}"):
            for child in sorted(parent.rglob("*"), key=lambda p: len(str(p)), reverse=True):
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
