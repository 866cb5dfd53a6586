"""A CRI client: drives a container runtime over its gRPC API as the kubelet does.

The messages come from cri_api.proto (a subset of runtime.v1, with the API's own
field numbers), loaded at run time by grpcio-tools: no generated code is kept."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

protos, services = grpc.protos_and_services("bench/lab/cri_api.proto")

BANDWIDTH_ANNOTATIONS = ("kubernetes.io/ingress-bandwidth", "kubernetes.io/egress-bandwidth")


@dataclass(frozen=True)
class Sandbox:
    id: str
    name: str
    namespace: str
    uid: str
    ip: str
    netns: str  # the pod's network namespace, as the runtime mounted it
    pid: int  # the pause process


class CRIClient:
    def __init__(self, socket_path: str, timeout: float = 60) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = services.RuntimeServiceStub(self.channel)
        self.timeout = timeout
        self.configs: dict[str, Any] = {}  # sandbox id -> its PodSandboxConfig

    def close(self) -> None:
        self.channel.close()

    def version(self) -> Any:
        return self.stub.Version(protos.VersionRequest(version="v1"), timeout=self.timeout)

    def run_pod(
        self,
        name: str,
        namespace: str,
        uid: str,
        annotations: dict[str, str],
        log_directory: str,
        cgroup_parent: str = "",
        host_network: bool = False,
        host_pid: bool = False,
        privileged: bool = False,
    ) -> str:
        """RunPodSandbox. host_network/host_pid: the node's namespaces, as the kubelet
        asks for a pod with hostNetwork/hostPID; privileged: the pod has a privileged
        container. The config is kept in `configs` (CreateContainer sends it again)."""
        node, pod = protos.NamespaceMode.Value("NODE"), protos.NamespaceMode.Value("POD")
        options = protos.NamespaceOption(network=node if host_network else pod, pid=node if host_pid else pod)
        config = protos.PodSandboxConfig(
            metadata=protos.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname="" if host_network else name,
            log_directory=log_directory,
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace},
            annotations=annotations,
            linux=protos.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=protos.LinuxSandboxSecurityContext(namespace_options=options, privileged=privileged),
            ),
        )
        reply = self.stub.RunPodSandbox(protos.RunPodSandboxRequest(config=config), timeout=self.timeout)
        self.configs[str(reply.pod_sandbox_id)] = config
        return str(reply.pod_sandbox_id)

    def status(self, sandbox_id: str) -> tuple[Any, dict[str, Any]]:
        """The sandbox's status and the runtime's verbose info (decoded JSON)."""
        reply = self.stub.PodSandboxStatus(
            protos.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=self.timeout
        )
        info = json.loads(reply.info["info"]) if "info" in reply.info else {}
        return reply.status, info

    def sandbox(self, sandbox_id: str) -> Sandbox:
        status, info = self.status(sandbox_id)
        namespaces = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
        netns = next((n.get("path", "") for n in namespaces if n.get("type") == "network"), "")
        md = status.metadata
        return Sandbox(sandbox_id, md.name, md.namespace, md.uid, status.network.ip, netns, int(info.get("pid", 0)))

    def stop_pod(self, sandbox_id: str) -> None:
        self.stub.StopPodSandbox(protos.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def remove_pod(self, sandbox_id: str) -> None:
        self.stub.RemovePodSandbox(protos.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def list_pods(self) -> list[str]:
        reply = self.stub.ListPodSandbox(protos.ListPodSandboxRequest(), timeout=self.timeout)
        return [str(item.id) for item in reply.items]

    # ------------------------------------------------------------ containers

    def create_container(self, sandbox_id: str, sandbox_config: Any, config: Any) -> str:
        reply = self.stub.CreateContainer(
            protos.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config),
            timeout=self.timeout,
        )
        return str(reply.container_id)

    def start_container(self, container_id: str) -> None:
        self.stub.StartContainer(protos.StartContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop_container(self, container_id: str, grace: int = 0) -> None:
        self.stub.StopContainer(
            protos.StopContainerRequest(container_id=container_id, timeout=grace), timeout=self.timeout + grace
        )

    def remove_container(self, container_id: str) -> None:
        self.stub.RemoveContainer(protos.RemoveContainerRequest(container_id=container_id), timeout=self.timeout)

    def container_status(self, container_id: str) -> tuple[Any, dict[str, Any]]:
        reply = self.stub.ContainerStatus(
            protos.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=self.timeout
        )
        info = json.loads(reply.info["info"]) if "info" in reply.info else {}
        return reply.status, info

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 10) -> tuple[int, bytes, bytes]:
        """ExecSync, as the kubelet runs an exec probe."""
        reply = self.stub.ExecSync(
            protos.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout), timeout=self.timeout + timeout
        )
        return int(reply.exit_code), bytes(reply.stdout), bytes(reply.stderr)
