"""Test pods for the demo, the tests and the benchmarks.

Everything lives in network namespaces created here and named with a "bwpt"
prefix: a private "node" namespace in which the CNI chain runs (so ptp's host
veths, ifbs and ip_forward never touch the real host) and one namespace per pod.
Leaving the context removes all of it, even after a failure."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bwplugin.datapath import bpf, tc, tcx
from bwplugin.datapath.netlink import Netlink
from bwplugin.node.install import install

from .libcni import Attachment, Runtime

PREFIX = "bwpt"
REFERENCE_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
NETNS_DIR = "/run/netns"
CONTAINERD_BURST = 4294967295  # bits: what containerd sends for both bursts
FORWARDER_SOURCE = Path(__file__).resolve().parent.parent.parent / "deploy" / "forwarder.c"
# Python run first in every plugin process and agent the lab starts: the tests put
# their fault hooks here (tests/faults.py), so that the product carries none
PRELUDE = ""
# the real libcni (bench/lab/cnidriver, built by the tests' session fixture); None: the
# emulation in libcni.py runs every chain
DRIVER: str | None = None
LAUNCH = "from bwplugin.node.client import main"
AGENT = "from bwplugin.node.agent import main; raise SystemExit(main())"


def build_forwarder(out: Path) -> Path:
    """deploy/forwarder.c, compiled as deploy/build-image.sh compiles it."""
    subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(out), str(FORWARDER_SOURCE)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def runtime_bandwidth(ingress: int = 0, egress: int = 0, burst: int = CONTAINERD_BURST) -> dict[str, Any]:
    """runtimeConfig as a CRI runtime fills it from the pod's bandwidth annotations."""
    bw: dict[str, Any] = {}
    if ingress:
        bw.update(ingressRate=ingress, ingressBurst=burst)
    if egress:
        bw.update(egressRate=egress, egressBurst=burst)
    return {"bandwidth": bw}


def kubernetes_args(pod: str, container_id: str, namespace: str = PREFIX) -> list[tuple[str, str]]:
    """CNI_ARGS as containerd's CRI plugin sends them for a pod sandbox."""
    return [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", pod),
        ("K8S_POD_INFRA_CONTAINER_ID", container_id),
        ("K8S_POD_UID", f"{PREFIX}-uid-{container_id}"),
    ]


class IperfError(RuntimeError):
    """iperf3 reported no result (for example: the server was still busy)."""


class TeardownError(AssertionError):
    """A lab's own teardown found a DEL that failed, or something a DEL left behind."""


@dataclass
class Pod:
    name: str
    netns: str
    attachment: Attachment | None = None

    @property
    def ip(self) -> str:
        assert self.attachment and self.attachment.result
        return str(self.attachment.result["ips"][0]["address"]).split("/")[0]

    @property
    def ip6(self) -> str:
        assert self.attachment and self.attachment.result
        return next(
            str(ip["address"]).split("/")[0] for ip in self.attachment.result["ips"] if ":" in str(ip["address"])
        )


def remove_pin_dir(path: str) -> None:
    """Unpin (attached programs live on until their filters go) and remove the dir."""
    pins = Path(path)
    if pins.is_dir():
        for pin in pins.iterdir():
            pin.unlink()
        pins.rmdir()


def ip_netns(*args: str) -> None:
    subprocess.run(["ip", "netns", *args], check=True, capture_output=True)


class Lab:
    def __init__(self, subnet: str = "10.234.0.0/24", agent: bool = False) -> None:
        self.tag = secrets.token_hex(3)
        self.use_agent = agent
        self.agent: subprocess.Popen[bytes] | None = None
        self.subnet = subnet
        self.pods: list[Pod] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: dict[tuple[str, int], tuple[subprocess.Popen[bytes], bool]] = {}
        self.node_name = f"{PREFIX}-{self.tag}-node"
        self.node = f"{NETNS_DIR}/{self.node_name}"

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.tag}-"))
        self.bin_dir = self.tmp / "bin"
        self.bin_dir.mkdir()
        for name in ("ptp", "bridge", "host-local", "loopback", "bandwidth"):
            os.symlink(f"{REFERENCE_DIR}/{name}", self.bin_dir / name)
        exe = install(self.bin_dir)
        if PRELUDE:
            exe.write_text(exe.read_text().replace(LAUNCH, f"{PRELUDE}\n{LAUNCH}"))
        try:
            ip_netns("add", self.node_name)
            self.run(self.node, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        # pins go to a private bpffs directory (shared by a whole test session when
        # BWPLUGIN_PIN_DIR is already set), never the node's real one
        self.own_pins = "BWPLUGIN_PIN_DIR" not in os.environ
        if self.own_pins:
            os.environ["BWPLUGIN_PIN_DIR"] = f"{bpf.BPFFS}/{PREFIX}-{self.tag}"
        # likewise the node lock and the redirect-probe cache, never /run/bwplugin
        self.own_run_dir = "BWPLUGIN_RUN_DIR" not in os.environ
        if self.own_run_dir:
            os.environ["BWPLUGIN_RUN_DIR"] = str(self.tmp / "run")
        private = {k: os.environ[k] for k in ("BWPLUGIN_PIN_DIR", "BWPLUGIN_RUN_DIR")}
        self.runtime = Runtime(
            [str(self.bin_dir)], node_netns=self.node, extra_env=dict(private),
            driver=DRIVER, cache_dir=str(self.tmp / "cni-cache"),
        )  # fmt: skip
        self.agent_socket = str(self.tmp / "agent" / "agent.sock")
        try:
            if self.use_agent:
                self.runtime.extra_env["BWPLUGIN_AGENT_SOCKET"] = self.agent_socket
                self.start_agent()
            else:
                self.runtime.extra_env["BWPLUGIN_NO_AGENT"] = "1"  # never a node agent by accident
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    # ------------------------------------------------------------ the agent

    def set_fault(self, spec: str | None) -> None:
        """For tests whose PRELUDE installs fault hooks: the step at which the next
        ADDs fail, in-process (the plugin's env) and in the agent (a file it reads)."""
        fault_file = self.tmp / "fault"
        if spec:
            self.runtime.extra_env["BWPLUGIN_FAULT"] = spec
            fault_file.write_text(spec)
        else:
            self.runtime.extra_env.pop("BWPLUGIN_FAULT", None)
            fault_file.unlink(missing_ok=True)

    def forwarder_bin_dir(self) -> Path:
        """A CNI bin dir whose bwplugin is the DaemonSet's static forwarder (built here as
        deploy/build-image.sh builds it); put it before bin_dir in the CNI path."""
        fwd = self.tmp / "bin-forwarder"
        if not (fwd / "bwplugin").exists():
            fwd.mkdir(exist_ok=True)
            build_forwarder(fwd / "bwplugin")
        return fwd

    def start_agent(self, *extra: str) -> None:
        """The node agent, in the node namespace (it must live in the host netns);
        `extra`: more of its command-line options."""
        # its settings are its own: the private pin and run directories, and where
        # the tests' fault hooks look for their switch
        env = {**os.environ, "BWPLUGIN_FAULT_FILE": str(self.tmp / "fault")}
        log = open(self.tmp / "agent.log", "ab")  # noqa: SIM115 (owned by the process)
        self.agent = subprocess.Popen(
            ["nsenter", f"--net={self.node}", sys.executable, "-c", f"{PRELUDE}\n{AGENT}",
             "--socket", self.agent_socket, *extra],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while not self._agent_answers():  # a stale socket file may exist: connect, don't stat
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {(self.tmp / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def _agent_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.agent_socket)
            except OSError:
                return False
        return True

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.agent is not None:
            if self.agent.poll() is None:
                self.agent.send_signal(sig)
            self.agent.wait(timeout=20)
            self.agent = None

    def __exit__(self, *exc: object) -> None:
        """Removes everything, even after a failure. When the test itself passed,
        a teardown DEL that failed, an agent that would not stop, or a map entry
        that the DELs left behind fails it: a DEL is never hidden here."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        problems: list[str] = []
        for pod in reversed(self.pods):
            if pod.attachment is not None:  # even a failed ADD gets its DEL, as runtimes do
                try:
                    pod.attachment.delete()
                except Exception as err:  # noqa: BLE001 (reported below, after the cleanup)
                    problems.append(f"DEL of {pod.name} at teardown: {err}")
        try:
            self.stop_agent()
        except subprocess.TimeoutExpired as err:
            problems.append(f"the agent did not stop: {err}")
            self.stop_agent(signal.SIGKILL)
        purged = self._purge_map_entries()
        if purged:
            problems.append(f"the DELs left map entries of attachments {purged}")
        for name in [p.name for p in self.pods] + [self.node_name]:
            if os.path.exists(f"{NETNS_DIR}/{name}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if getattr(self, "own_pins", False):
            remove_pin_dir(os.environ.pop("BWPLUGIN_PIN_DIR"))
        if getattr(self, "own_run_dir", False):
            os.environ.pop("BWPLUGIN_RUN_DIR")
        if problems and exc[0] is None:
            raise TeardownError("; ".join(problems))

    def _purge_map_entries(self) -> list[int]:
        """Map entries of this lab's attachments that a failed DEL left behind would
        outlive it: those of its container IDs, and those its node's veths carry.
        Returns the attachment IDs it removed."""
        fd, lpm = bpf.open_map(), bpf.open_lpm()
        purged: list[int] = []
        if fd is None:
            return purged
        try:
            carried: set[int] = set()
            if os.path.exists(self.node):
                with Netlink.in_netns(self.node) as nl:
                    for link in nl.links():
                        if link.kind == "veth":
                            carried |= {f.classid for f in tc.our_filters(nl, link.index).values()}
            for attach_id, entry in bpf.attach_entries(fd).items():
                if attach_id in carried or entry.container_id.startswith(f"{PREFIX}-{self.tag}-"):
                    tcx.detach(entry.owner)  # its pinned TCX links, if any
                    bpf.release(fd, lpm, attach_id)
                    purged.append(attach_id)
            # records and claims of entries that tests removed by hand (to stage a state)
            live = set(bpf.attach_entries(fd))
            for rec_fd, size in ((bpf.open_pods(), bpf.POD_VAL.size), (bpf.open_shaping(), bpf.SHAPING_VAL.size)):
                if rec_fd is None:
                    continue
                try:
                    for key, _ in bpf.map_items(rec_fd, bpf.KEY.size, size):
                        if bpf.KEY.unpack(key)[0] not in live:
                            bpf.map_delete(rec_fd, key)
                finally:
                    bpf.close_fds(rec_fd)
            tcx_fd = bpf.open_tcx()
            if tcx_fd is not None:
                try:
                    bpf.tcx_drop_stale(tcx_fd, fd)
                finally:
                    bpf.close_fds(tcx_fd)
        finally:
            bpf.close_fds(fd, lpm)
        return purged

    # ------------------------------------------------------------ pods

    def remove_pod(self, pod: Pod) -> None:
        """DEL its attachment (as a runtime would) and delete its namespace."""
        try:
            if pod.attachment is not None:
                pod.attachment.delete()
        finally:
            pod.attachment = None
            subprocess.run(["ip", "netns", "del", pod.name], capture_output=True)
            self.pods.remove(pod)

    def pod(self, name: str) -> Pod:
        full = f"{PREFIX}-{self.tag}-{name}"
        ip_netns("add", full)
        pod = Pod(full, f"{NETNS_DIR}/{full}")
        self.pods.append(pod)
        self.run(pod.netns, "ip", "link", "set", "lo", "up")
        return pod

    def conflist(
        self,
        shaper: dict[str, Any] | None,
        version: str = "1.0.0",
        name: str = "bwpt-net",
        mtu: int = 0,
        subnet: str | None = None,
        subnet6: str | None = None,
    ) -> dict[str, Any]:
        """A ptp network; with subnet6, dual-stack (one IPv4 and one IPv6 address)."""
        ipam: dict[str, Any] = {
            "type": "host-local",
            "subnet": subnet or self.subnet,
            "dataDir": str(self.tmp / f"ipam-{name}"),
            "routes": [{"dst": "0.0.0.0/0"}],
        }
        if subnet6:
            ipam["ranges"] = [[{"subnet": ipam.pop("subnet")}], [{"subnet": subnet6}]]
            ipam["routes"].append({"dst": "::/0"})
        ptp: dict[str, Any] = {"type": "ptp", "ipMasq": False, "ipam": ipam}
        if mtu:
            ptp["mtu"] = mtu
        if version == "1.1.0":
            ptp["cniVersion"] = "1.0.0"  # Debian's ptp stops at 1.0.0; libcni converts its result
        plugins = [ptp] + ([shaper] if shaper else [])
        return {"cniVersion": version, "name": name, "plugins": plugins}

    def attach(
        self,
        pod: Pod,
        conflist: dict[str, Any],
        runtime_config: dict[str, Any] | None = None,
        ifname: str = "eth0",
        container_id: str | None = None,
        between: Callable[[dict[str, Any]], None] | None = None,
    ) -> Attachment:
        cid = container_id or f"{pod.name}-cid"
        att = Attachment(self.runtime, conflist, cid, pod.netns, ifname, runtime_config, kubernetes_args(pod.name, cid))
        pod.attachment = att
        att.add(between)
        return att

    def exec_shaper(
        self, command: str, pod: Pod, conf: dict[str, Any] | bytes, ifname: str = "eth0", **env: str
    ) -> Any:
        """Run bwplugin alone, as the runtime would, for the given pod."""
        cid = pod.attachment.container_id if pod.attachment else f"{pod.name}-cid"
        return self.runtime.exec("bwplugin", command, conf, container_id=cid, netns=pod.netns, ifname=ifname, env=env)

    # ------------------------------------------------------------ processes

    def run(self, netns: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net={netns}", *argv], capture_output=True, text=True, check=True, timeout=timeout
        )

    def spawn(self, netns: str, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def iperf_server(self, pod: Pod, port: int = 5201, any_address: bool = False) -> subprocess.Popen[bytes]:
        """Bound to the pod's IPv4 address, or (any_address) to both families."""
        bind = () if any_address else ("-B", pod.ip)
        proc = self.spawn(pod.netns, "iperf3", "-s", *bind, "-p", str(port))
        self.servers[(pod.name, port)] = (proc, any_address)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait until it listens
            out = self.run(pod.netns, "ss", "-Hltn", f"sport = :{port}").stdout
            if out.strip():
                break
            time.sleep(0.05)
        return proc

    def _restart_iperf_server(self, pod: Pod, port: int) -> None:
        """An iperf3 server can stay "busy" for minutes with a test whose client is
        gone (its pod deleted while the end-of-test exchange sat in a bloated queue)."""
        proc, any_address = self.servers[(pod.name, port)]
        proc.kill()
        proc.wait()
        while self.run(pod.netns, "ss", "-Hltn", f"sport = :{port}").stdout.strip():
            time.sleep(0.05)
        self.iperf_server(pod, port, any_address)

    def iperf(
        self,
        client: Pod,
        server: Pod,
        seconds: float = 3,
        omit: int = 1,
        reverse: bool = False,
        udp_rate: int = 0,
        udp_length: int = 1400,
        port: int = 5201,
        extra: tuple[str, ...] = (),
        server_ip: str | None = None,
    ) -> dict[str, Any]:
        argv = ["iperf3", "-c", server_ip or server.ip, "-p", str(port), "-t", str(seconds), "-O", str(omit), "-J"]
        argv += extra
        if reverse:
            argv.append("-R")
        if udp_rate:
            argv += ["-u", "-b", str(udp_rate), "-l", str(udp_length)]
        # the server may still be closing the previous test (a bloated queue can hold
        # its end-of-test exchange for tens of seconds): retry while it says busy, and
        # restart a server that stays busy (the previous client is gone by then)
        start = time.monotonic()
        restarted = False
        while True:
            proc = subprocess.run(
                ["nsenter", f"--net={client.netns}", *argv], capture_output=True, text=True, timeout=seconds + 60
            )
            result: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
            if proc.returncode == 0 and "error" not in result and result.get("end"):
                return result
            if "busy" not in str(result.get("error", "")) or time.monotonic() - start > 60:
                break
            if not restarted and time.monotonic() - start > 10 and (server.name, port) in self.servers:
                self._restart_iperf_server(server, port)
                restarted = True
            time.sleep(1)
        raise IperfError(f"iperf3 {' '.join(argv[1:])}: {result.get('error') or proc.stderr.strip()}")
