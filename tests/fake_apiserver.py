"""A stand-in for the Kubernetes API server, for the agent's annotation watch.

No kube-apiserver can run on this machine, so this serves only what the watch
uses, the way the API server serves it: GET /api/v1/pods?fieldSelector=...
(a PodList with its resourceVersion) and the same with watch=true (a chunked
stream of JSON events from a resourceVersion on, ended after timeoutSeconds).
The test drives it: pods added, modified and deleted, the history compacted
(a watch from before it gets an ERROR event with code 410, as the API server
sends), and connections dropped. The agent's real `kubernetes` client talks to
it; nothing of the watcher is replaced."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bwplugin.datapath.netlink import CLONE_NEWNET, in_helper_thread, libc


def pod_object(namespace: str, name: str, uid: str, node: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "annotations": dict(annotations)},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "bwpt.local/pause:1"}]},
        "status": {"phase": "Running"},
    }  # fmt: skip


class FakeAPIServer:
    """tls_dir: serve HTTPS with a certificate for 127.0.0.1 made there, as a pod's
    in-cluster config expects (service_account() writes what the kubelet mounts)."""

    TOKEN = "bwpt-test-token"

    def __init__(self, netns: str, tls_dir: Path | None = None) -> None:
        self.lock = threading.Condition()
        self.version = 100
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (resourceVersion, type, pod)
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.requests: list[dict[str, list[str]]] = []  # the query of every request
        self.streams: list[socket.socket] = []
        self.generation = 0  # bumped by drop(): open streams end abruptly
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = _listening_socket_in(netns)
        self.tls_dir = tls_dir
        if tls_dir is not None:
            tls_dir.mkdir(parents=True, exist_ok=True)
            cert, key = tls_dir / "ca.crt", tls_dir / "server.key"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=bwpt-apiserver",
                 "-addext", "subjectAltName=IP:127.0.0.1"],
                check=True, capture_output=True,
            )  # fmt: skip
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.authorizations: list[str] = []  # the Authorization header of every request
        self.server.fake = self  # type: ignore[attr-defined]
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeAPIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()
        self.server.shutdown()
        self.server.server_close()

    def service_account(self, path: Path) -> Path:
        """The files the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
        assert self.tls_dir is not None, "in-cluster config needs HTTPS"
        path.mkdir(parents=True, exist_ok=True)
        (path / "token").write_text(self.TOKEN)
        (path / "namespace").write_text("kube-system")
        (path / "ca.crt").write_bytes((self.tls_dir / "ca.crt").read_bytes())
        return path

    def kubeconfig(self, path: str) -> str:
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "bwpt",
            "clusters": [{"name": "bwpt", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "bwpt", "user": {"token": self.TOKEN}}],
            "contexts": [{"name": "bwpt", "context": {"cluster": "bwpt", "user": "bwpt"}}],
        }  # fmt: skip
        with open(path, "w") as fh:
            json.dump(doc, fh)  # JSON is YAML
        return path

    # ------------------------------------------------------------ what the test does

    def put(self, pod: dict[str, Any], kind: str | None = None) -> None:
        with self.lock:
            self.version += 1
            pod = json.loads(json.dumps(pod))
            pod["metadata"]["resourceVersion"] = str(self.version)
            uid = pod["metadata"]["uid"]
            kind = kind or ("MODIFIED" if uid in self.pods else "ADDED")
            if kind == "DELETED":
                self.pods.pop(uid, None)
            else:
                self.pods[uid] = pod
            self.events.append((self.version, kind, pod))
            self.lock.notify_all()

    def compact(self) -> None:
        """Forget the history so far: a watch resuming from before now gets 410."""
        with self.lock:
            self.compacted = self.version + 1
            self.lock.notify_all()

    def drop(self) -> None:
        """Cut every open watch connection, as a restarting API server does."""
        with self.lock:
            self.generation += 1
            for sock in self.streams:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.streams.clear()
            self.lock.notify_all()

    def lists(self) -> int:
        return sum(1 for q in self.requests if not _true(q.get("watch", ["false"])[0]))


def _true(text: str) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool)."""
    return text in ("1", "t", "T", "true", "TRUE", "True")


def _listening_socket_in(netns: str) -> socket.socket:
    """A socket bound on loopback inside `netns` (the lab's node, where the agent
    runs): made by a helper thread that entered it; the socket keeps it."""

    def work() -> socket.socket:
        fd = os.open(netns, os.O_RDONLY)
        try:
            if libc().setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({netns})")
        finally:
            os.close(fd)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        return sock

    return in_helper_thread(work, "bwpt-apiserver-netns")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        fake: FakeAPIServer = self.server.fake  # type: ignore[attr-defined]
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        fake.requests.append(query)
        fake.authorizations.append(str(self.headers.get("Authorization", "")))
        if url.path != "/api/v1/pods":
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
            return
        if _true(query.get("watch", ["false"])[0]):
            self._watch(fake, int(query.get("resourceVersion", ["0"])[0] or 0),
                        float(query.get("timeoutSeconds", ["300"])[0]))  # fmt: skip
            return
        with fake.lock:
            items = list(fake.pods.values())
            version = fake.version
        self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(version)},
                         "items": items})  # fmt: skip

    def _json(self, code: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, doc: dict[str, Any]) -> None:
        line = json.dumps(doc).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _watch(self, fake: FakeAPIServer, since: int, timeout: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        deadline = time.monotonic() + timeout
        with fake.lock:
            fake.streams.append(self.connection)
            generation = fake.generation
        try:
            while time.monotonic() < deadline:
                with fake.lock:
                    if fake.generation != generation:
                        return  # dropped: no clean end of the stream
                    if since < fake.compacted:
                        gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                                "message": f"too old resource version: {since}", "code": 410}  # fmt: skip
                        self._chunk({"type": "ERROR", "object": gone})
                        break
                    pending = [e for e in fake.events if e[0] > since]
                    if not pending:
                        fake.lock.wait(0.2)
                        continue
                for version, kind, pod in pending:
                    self._chunk({"type": kind, "object": pod})
                    since = version
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass
        finally:
            with fake.lock:
                if self.connection in fake.streams:
                    fake.streams.remove(self.connection)
            self.close_connection = True
