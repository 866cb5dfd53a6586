"""deploy/daemonset.yaml, run on a private containerd as the kubelet would run it.

The pod template is read from the manifest itself: host namespaces, privileges,
commands, environment, volumes and mounts, probes. The containers are created
over CRI (RunPodSandbox, CreateContainer, StartContainer, ExecSync for the exec
probes) from the image deploy/build-image.sh builds, imported with ctr.

No kubelet or API server runs here, so what the kubelet would add is added the
same way, and only that: the fieldRef env (spec.nodeName) is filled in, and
the hostPath volumes are relocated, since the lab must not write the machine's
own /opt/cni/bin, /opt/bwplugin, /run/bwplugin or /sys/fs/bpf:

- /opt/cni/bin        -> the private containerd's CNI bin dir;
- /sys/fs/bpf         -> a bpffs of the lab's own (a separate instance, shared mount);
- /run/netns, /var/run/netns -> where the private containerd mounts pod netns
  (at the same path inside the container, so CNI_NETNS opens there too);
- read-only system paths (/lib/modules, /usr/src) -> the host's own;
- any other path      -> the same path under a private root.

Command arguments that name a relocated host path (`--lib-on-host /opt/bwplugin`)
are relocated with it; nothing else of the manifest is changed."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from .containerd import HOST_ROOT, Containerd, LabError, sh
from .cri import protos

ROOT = Path(__file__).resolve().parent.parent.parent
MANIFEST = ROOT / "deploy" / "daemonset.yaml"
BUILD_SCRIPT = ROOT / "deploy" / "build-image.sh"
NETNS_PATHS = ("/run/netns", "/var/run/netns")
PROPAGATION = {
    None: "PROPAGATION_PRIVATE",
    "None": "PROPAGATION_PRIVATE",
    "HostToContainer": "PROPAGATION_HOST_TO_CONTAINER",
    "Bidirectional": "PROPAGATION_BIDIRECTIONAL",
}


# ---------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class VolumeMount:
    volume: str
    host_path: str
    container_path: str
    readonly: bool
    propagation: str  # the CRI enum's name


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    env: dict[str, str]  # literal values; fieldRefs as "fieldRef:<path>"
    mounts: list[VolumeMount]
    privileged: bool
    readiness: list[str] | None  # exec probe commands
    liveness: list[str] | None


@dataclass(frozen=True)
class PodTemplate:
    name: str
    namespace: str
    host_network: bool
    host_pid: bool
    init_containers: list[ContainerSpec]
    containers: list[ContainerSpec]
    grace: int


def read_manifest(path: Path = MANIFEST) -> PodTemplate:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    ds = next(d for d in docs if d.get("kind") == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes", [])}

    def container(c: dict[str, Any]) -> ContainerSpec:
        env = {}
        for item in c.get("env", []):
            ref = (item.get("valueFrom") or {}).get("fieldRef")
            env[item["name"]] = f"fieldRef:{ref['fieldPath']}" if ref else str(item.get("value", ""))

        def probe(kind: str) -> list[str] | None:
            exec_ = (c.get(kind) or {}).get("exec")
            return [str(a) for a in exec_["command"]] if exec_ else None

        return ContainerSpec(
            name=c["name"],
            image=c["image"],
            command=[str(a) for a in c.get("command", [])] + [str(a) for a in c.get("args", [])],
            env=env,
            mounts=[
                VolumeMount(
                    m["name"], volumes[m["name"]], m["mountPath"], bool(m.get("readOnly")),
                    PROPAGATION[m.get("mountPropagation")],
                )
                for m in c.get("volumeMounts", [])
            ],
            privileged=bool((c.get("securityContext") or {}).get("privileged")),
            readiness=probe("readinessProbe"),
            liveness=probe("livenessProbe"),
        )  # fmt: skip

    return PodTemplate(
        name=ds["metadata"]["name"],
        namespace=ds["metadata"].get("namespace", "default"),
        host_network=bool(spec.get("hostNetwork")),
        host_pid=bool(spec.get("hostPID")),
        init_containers=[container(c) for c in spec.get("initContainers", [])],
        containers=[container(c) for c in spec.get("containers", [])],
        grace=int(spec.get("terminationGracePeriodSeconds", 30)),
    )


# ---------------------------------------------------------------- the image


def build_image(out: Path, tag: str, cache: Path, source: Path = ROOT) -> Path:
    """deploy/build-image.sh, as a user runs it (source: the tree to build from)."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "-o", str(out), "-t", tag, "-s", str(source), "-c", str(cache)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise LabError(f"build-image.sh failed: {proc.stderr[-3000:]}")
    return out


def import_image(ctrd: Containerd, archive: Path, image: str) -> None:
    """ctr images import, as the README tells a node owner: the archive's tag
    under the manifest's repository name."""
    repository, _, tag = image.rpartition(":")
    ctrd.ctr("images", "import", "--base-name", repository, str(archive))
    if image not in ctrd.ctr("images", "ls", "-q").split():
        raise LabError(f"{image} is not in containerd after the import (tag {tag})")


# ---------------------------------------------------------------- the node's paths


@dataclass
class NodePaths:
    """Where the lab puts each hostPath of the manifest (see the module's doc)."""

    ctrd: Containerd
    root: Path = field(init=False)
    bpffs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.ctrd.dir / HOST_ROOT
        self.bpffs = self.root / "sys/fs/bpf"
        self.bpffs.mkdir(parents=True)
        sh("mount", "-t", "bpf", "bwpt-bpffs", str(self.bpffs))
        sh("mount", "--make-shared", str(self.bpffs))  # Bidirectional needs a shared source
        self.netns = self.ctrd.dir / "state" / "io.containerd.grpc.v1.cri" / "netns"
        self.netns.mkdir(parents=True, exist_ok=True)
        # HostToContainer needs a shared (or slave) source mount
        sh("mount", "--bind", str(self.netns), str(self.netns))
        sh("mount", "--make-shared", str(self.netns))

    def host(self, path: str, readonly: bool) -> str:
        if path == "/opt/cni/bin":
            return str(self.ctrd.dir / "bin")
        if path == "/sys/fs/bpf":
            return str(self.bpffs)
        if path in NETNS_PATHS:
            return str(self.netns)
        if readonly:
            return path
        target = self.root / path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    def in_container(self, mount: VolumeMount) -> str:
        return str(self.netns) if mount.host_path in NETNS_PATHS else mount.container_path

    def argument(self, arg: str, mounts: list[VolumeMount]) -> str:
        def under(path: str) -> bool:
            return arg == path or arg.startswith(path.rstrip("/") + "/")

        if any(under(m.container_path) for m in mounts):
            return arg  # a path inside the container (the socket), not one of the host's
        for m in mounts:
            if arg == m.host_path or arg.startswith(m.host_path.rstrip("/") + "/"):
                return self.host(m.host_path, m.readonly) + arg[len(m.host_path.rstrip("/")) :]
        return arg

    def unmount(self) -> None:
        for point in (self.bpffs, self.netns):
            sh("umount", "-l", str(point), check=False)


# ---------------------------------------------------------------- the pod


@dataclass
class DaemonPod:
    """One node's pod of the DaemonSet: its sandbox and its running containers."""

    sandbox: str
    config: Any
    containers: dict[str, str]  # name -> container id
    init_logs: dict[str, str]


class DaemonSetRunner:
    """Runs the manifest's pod template on a private containerd."""

    def __init__(self, ctrd: Containerd, template: PodTemplate, node_name: str) -> None:
        self.ctrd = ctrd
        self.template = template
        self.node_name = node_name
        self.paths = NodePaths(ctrd)
        self.extra_env: dict[str, str] = {}  # what the kubelet adds (KUBERNETES_SERVICE_HOST, ...)
        self.extra_mounts: list[tuple[str, str]] = []  # (host path, container path), read-only
        self.pods: list[DaemonPod] = []

    @property
    def cri(self) -> Any:
        assert self.ctrd.cri is not None
        return self.ctrd.cri

    def _config(self, spec: ContainerSpec, image: str, attempt: int, logs: Path) -> Any:
        env = {k: (self.node_name if v == "fieldRef:spec.nodeName" else v) for k, v in spec.env.items()}
        env.update(self.extra_env)
        if any(v.startswith("fieldRef:") for v in env.values()):
            raise LabError(f"{spec.name}: a fieldRef the lab does not fill in: {env}")
        mounts = {}
        for m in spec.mounts:
            path = self.paths.in_container(m)
            mounts[path] = protos.Mount(
                container_path=path,
                host_path=self.paths.host(m.host_path, m.readonly),
                readonly=m.readonly,
                propagation=protos.MountPropagation.Value(m.propagation),
            )  # fmt: skip  (the two netns volumes land on one path: mounted once)
        for host, inside in self.extra_mounts:
            mounts[inside] = protos.Mount(container_path=inside, host_path=host, readonly=True)
        node, pod = protos.NamespaceMode.Value("NODE"), protos.NamespaceMode.Value("CONTAINER")
        options = protos.NamespaceOption(
            network=node if self.template.host_network else protos.NamespaceMode.Value("POD"),
            pid=node if self.template.host_pid else pod,
        )
        return protos.ContainerConfig(
            metadata=protos.ContainerMetadata(name=spec.name, attempt=attempt),
            image=protos.ImageSpec(image=image or spec.image),
            command=[self.paths.argument(a, spec.mounts) for a in spec.command],
            envs=[protos.KeyValue(key=k, value=v) for k, v in env.items()],
            mounts=list(mounts.values()),
            log_path=f"{spec.name}-{attempt}.log",
            linux=protos.LinuxContainerConfig(
                security_context=protos.LinuxContainerSecurityContext(
                    privileged=spec.privileged, namespace_options=options
                )
            ),
        )

    def start(self, image: str = "", ready_timeout: float = 120) -> DaemonPod:
        """The pod as the kubelet starts it: each init container to completion (a
        failure stops here), then the containers, then the readiness probe."""
        t = self.template
        logs = self.ctrd.dir / "logs" / f"{t.name}-{secrets.token_hex(3)}"
        logs.mkdir(parents=True)
        uid = f"{self.ctrd.tag}-{secrets.token_hex(8)}"
        sid = self.cri.run_pod(
            f"{t.name}-{self.node_name}", t.namespace, uid, {}, str(logs), cgroup_parent=f"/{self.ctrd.name}",
            host_network=t.host_network, host_pid=t.host_pid,
            privileged=any(c.privileged for c in t.init_containers + t.containers),
        )  # fmt: skip
        config = self.cri.configs[sid]
        pod = DaemonPod(sid, config, {}, {})
        self.pods.append(pod)
        for spec in t.init_containers:
            cid = self.cri.create_container(sid, config, self._config(spec, image, 0, logs))
            self.cri.start_container(cid)
            status = self._wait_exited(cid, 300)
            pod.init_logs[spec.name] = (logs / f"{spec.name}-0.log").read_text(errors="replace")
            if status.exit_code != 0:
                raise LabError(f"init container {spec.name} exited {status.exit_code}: {pod.init_logs[spec.name]}")
        for spec in t.containers:
            cid = self.cri.create_container(sid, config, self._config(spec, image, 0, logs))
            self.cri.start_container(cid)
            pod.containers[spec.name] = cid
        self.wait_ready(pod, ready_timeout)
        return pod

    def restart(self, pod: DaemonPod, name: str, attempt: int) -> None:
        """The kubelet's restart of a crashed container: a new attempt in the same pod,
        once containerd reports the old one exited (its exit is noticed asynchronously,
        and a running container cannot be removed)."""
        self._wait_exited(pod.containers[name], 30)
        spec = next(c for c in self.template.containers if c.name == name)
        logs = Path(pod.config.log_directory)
        cid = self.cri.create_container(pod.sandbox, pod.config, self._config(spec, "", attempt, logs))
        self.cri.remove_container(pod.containers[name])
        self.cri.start_container(cid)
        pod.containers[name] = cid

    def _wait_exited(self, cid: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.cri.container_status(cid)
            if status.state == protos.ContainerState.Value("CONTAINER_EXITED"):
                return status
            if time.monotonic() > deadline:
                raise LabError(f"container {cid[:12]} did not exit in {timeout:g} s")
            time.sleep(0.2)

    def probe(self, pod: DaemonPod, kind: str = "readiness", name: str = "agent") -> tuple[int, str]:
        """An exec probe of the manifest, run as the kubelet runs it (ExecSync)."""
        spec = next(c for c in self.template.containers if c.name == name)
        cmd = spec.readiness if kind == "readiness" else spec.liveness
        if not cmd:
            raise LabError(f"the manifest's {name} container has no exec {kind} probe")
        try:
            code, out, err = self.cri.exec_sync(pod.containers[name], cmd, timeout=10)
        except grpc.RpcError as exc:  # the container is not running: the kubelet counts a failure
            return -1, str(exc.details() if hasattr(exc, "details") else exc)
        return code, (out + err).decode(errors="replace")

    def wait_ready(self, pod: DaemonPod, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            code, last = self.probe(pod, "readiness")
            if code == 0:
                return
            time.sleep(0.5)
        raise LabError(f"the agent did not become ready in {timeout:g} s: {last} {self.logs(pod)[-2000:]}")

    def logs(self, pod: DaemonPod, name: str = "agent") -> str:
        status, _ = self.cri.container_status(pod.containers[name])
        path = Path(status.log_path)
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, pod: DaemonPod, name: str = "agent") -> int:
        _, info = self.cri.container_status(pod.containers[name])
        return int(info.get("pid", 0))

    def stop(self, pod: DaemonPod) -> None:
        """As the kubelet deletes the pod: stop with the grace period, remove."""
        for cid in pod.containers.values():
            self.cri.stop_container(cid, self.template.grace)
            self.cri.remove_container(cid)
        self.cri.stop_pod(pod.sandbox)
        self.cri.remove_pod(pod.sandbox)
        self.pods.remove(pod)

    def close(self) -> None:
        for pod in list(self.pods):
            try:
                self.stop(pod)
            except Exception:  # teardown: containerd's own exit removes the rest
                self.pods.remove(pod)
        self.paths.unmount()


def exec_json(runner: DaemonSetRunner, pod: DaemonPod, *argv: str) -> Any:
    code, out, err = runner.cri.exec_sync(pod.containers["agent"], list(argv), timeout=30)
    if code != 0:
        raise LabError(f"{argv}: exit {code}: {err.decode(errors='replace')}")
    return json.loads(out)


def host_env(runner: DaemonSetRunner) -> dict[str, str]:
    """The environment of a person on the node (containerd's, dialling the agent's
    relocated socket), with the pins and run dir where the agent keeps them."""
    env = runner.ctrd.env()
    env["BWPLUGIN_PIN_DIR"] = str(runner.paths.bpffs / "bwplugin")
    env["BWPLUGIN_RUN_DIR"] = str(runner.paths.root / "run/bwplugin")
    return env
