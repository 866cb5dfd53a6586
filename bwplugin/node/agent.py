"""The resident node agent: serves CNI requests forwarded by the thin client
(bwplugin/node/client.py) over a root-only unix socket, with everything already
imported and the pinned program's path computed. It runs the very same
cli.run() as the in-process path, so results and error codes are identical.

It keeps no state of its own: the kernel (links, qdiscs, filters) and bpffs
(program, attach map) are the source of truth, so it can be killed and
restarted at any time. It must run in the host network namespace."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import cli
from ..cni import settings
from ..commands import add, delete, gc, handover
from ..datapath import tcx
from ..datapath.netlink import Link, Netlink
from .client import DEFAULT_SOCKET, FORWARDED, OP

if TYPE_CHECKING:
    from .watch import PodWatcher

OPS = ("set", "health")  # BWPLUGIN_OP values: a live change, the health probe
HEALTH_TIMEOUT = 8.0  # s the health probe waits for the agent's answer (STATUS may run a kernel probe)
MAX_HEADER = 64  # bytes of the "<env> <stdin>" length line
MAX_ENV = 64 << 10  # the CNI_* variables
MAX_STDIN = 1 << 20  # a config with its prevResult: a few KB in practice
MAX_CLIENTS = 32  # requests served at once; further clients wait in the listen backlog
CLIENT_TIMEOUT = 10.0  # s a client may take to send its request (a slow one is cut off)
DRAIN_TIMEOUT = 30.0  # s that requests in flight at SIGTERM get to finish


def decode_request(head: bytes, read: Callable[[int], bytes]) -> tuple[dict[str, str], bytes]:
    """Only the CNI protocol travels: CNI_* variables and stdin. The agent's own
    settings (pin and run directories, the C source) are its own environment's,
    never the caller's."""
    env_len, stdin_len = (int(x) for x in head.split())
    if not (0 <= env_len <= MAX_ENV and 0 <= stdin_len <= MAX_STDIN):
        raise ValueError(f"request too large ({env_len} + {stdin_len} bytes)")
    block, stdin = read(env_len), read(stdin_len)
    if len(block) != env_len or len(stdin) != stdin_len:
        raise ValueError("truncated request")
    env = {}
    for item in block.split(b"\0"):
        key, sep, value = item.decode().partition("=")
        if sep and (key.startswith(FORWARDED) or key == OP and value in OPS):
            env[key] = value
    return env, stdin


def error_reply(code: int, msg: str) -> bytes:
    """A CNI error the client prints as it is, so the runtime sees a spec answer."""
    return encode_reply(1, {"cniVersion": "1.1.0", "code": code, "msg": msg}, [f"bwplugin agent: {msg}"])


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def encode_reply(code: int, out: dict[str, Any] | None, log: list[str]) -> bytes:
    body = (json.dumps(out) + "\n").encode() if out is not None else b""
    err = "".join(line + "\n" for line in log).encode()
    return b"%d %d %d\n" % (code, len(body), len(err)) + body + err


class Handler(socketserver.StreamRequestHandler):
    timeout = CLIENT_TIMEOUT  # a client that never finishes its request is cut off

    def handle(self) -> None:
        uid = peer_uid(self.request)
        if uid != 0:  # the socket's mode says so too; this holds even if someone changes it
            self._refuse(f"the bwplugin agent serves root only (peer uid {uid})")
            return
        try:
            head = self.rfile.readline(MAX_HEADER)
            if not head:
                return  # a readiness probe: connected and closed
            env, stdin = decode_request(head, self.rfile.read)
        except (ValueError, UnicodeDecodeError, OSError) as exc:  # OSError: the client timed out
            self._refuse(f"malformed request: {exc}")
            return
        lines: list[str] = []
        start = time.perf_counter()
        with settings.request(env, lines):
            if env.get(OP) == "set":
                code, set_out = cli.run_set(stdin)
                out: dict[str, Any] | None = set_out
                command = "SET"
            elif env.get(OP) == "health":
                code, out = 0, cast(Server, self.server).health()
                command = "HEALTH"
            else:
                code, out = cli.run(env, stdin)
                command = env.get("CNI_COMMAND", "")
        metrics = cast(Server, self.server).metrics
        if metrics is not None:
            metrics.observe(command, out, time.perf_counter() - start)
        with contextlib.suppress(OSError):  # the client may be gone; the work is done
            self.wfile.write(encode_reply(code, out, lines))
        server = cast(Server, self.server)
        if server.mover is not None:
            server.mover.flush()  # an ADD's handover to TCX links, now that it has answered

    def _refuse(self, msg: str) -> None:
        """Answer with a CNI error, then read (a bounded amount of) what the client
        still sends: closing on unread data would reset the connection before the
        client reads the answer."""
        with contextlib.suppress(OSError):
            self.wfile.write(error_reply(5, msg))
            self.wfile.flush()
            self.request.shutdown(socket.SHUT_WR)
            left = MAX_HEADER + MAX_ENV + MAX_STDIN
            while left > 0 and (chunk := self.request.recv(min(left, 65536))):
                left -= len(chunk)


class Server(socketserver.ThreadingUnixStreamServer):
    """At most MAX_CLIENTS requests at once (bounded threads and memory), and a
    count of those in flight, so that a stop can let them finish."""

    request_queue_size = 128  # the listen backlog: clients beyond it block in connect()
    daemon_threads = True  # past DRAIN_TIMEOUT a stuck request must not block the stop
    block_on_close = False  # serve() waits for requests in flight itself, with a bound

    def __init__(self, path: str, metrics: AgentMetrics | None = None) -> None:
        super().__init__(path, Handler)
        self.metrics = metrics
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.idle = threading.Condition()
        self.in_flight = 0
        self.watch_thread: threading.Thread | None = None
        self.mover: Mover | None = None  # set by serve()

    def health(self) -> dict[str, Any]:
        """Live: this answer came, and the annotation watch (if on) still runs.
        Ready: also, STATUS finds nothing that stops this node shaping pods (the
        same check, so the runtime's STATUS and the kubelet's probe agree)."""
        from ..commands.status import status_problems

        watch = "off" if self.watch_thread is None else "running" if self.watch_thread.is_alive() else "stopped"
        problems = status_problems()
        live = watch != "stopped"
        return {
            "live": live,
            "ready": live and not problems,
            "problems": problems,
            "watch": watch,
            "inFlight": self.in_flight - 1,  # not counting this probe
            "pid": os.getpid(),
        }

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()  # blocks accepting while MAX_CLIENTS are served
        with self.idle:
            self.in_flight += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self.idle:
            self.in_flight -= 1
            self.idle.notify_all()
        self.slots.release()

    def wait_idle(self, timeout: float) -> int:
        """Wait for the requests in flight; returns how many are still running."""
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.in_flight and (left := deadline - time.monotonic()) > 0:
                self.idle.wait(left)
            return self.in_flight


class Releaser:
    """Deletes inert ifbs, and detaches unpinned TCX links, after DEL has answered.
    Drained on shutdown; what a crash leaves is swept at the next start
    (gc.orphan_ifbs; the kernel detaches links whose last fd a dead process held)
    or by GC."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Link | list[int] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="bwplugin-ifb-release", daemon=True)
        self.thread.start()

    def __call__(self, item: Link | list[int]) -> None:
        self.queue.put(item)

    def _run(self) -> None:
        with Netlink() as nl:
            while (item := self.queue.get()) is not None:
                try:
                    if isinstance(item, list):
                        tcx.release(item)
                    else:
                        gc.delete_ifb_if_same(nl, item)
                except OSError as exc:
                    print(f"bwplugin agent: releasing {item} failed: {exc}", file=sys.stderr, flush=True)

    def drain(self) -> None:
        self.queue.put(None)
        self.thread.join()


class Mover:
    """Moves attachments' counting to TCX links (commands/handover.py) once their
    ADD has answered: ADD hands them over, and they are queued when its reply has
    been written, so that the answer never waits for the kernel's RCU waits."""

    def __init__(self) -> None:
        self.queue: queue.Queue[handover.Handover | None] = queue.Queue()
        self.held = threading.local()  # the request thread's items, until its reply is out
        self.thread = threading.Thread(target=self._run, name="bwplugin-tcx-handover", daemon=True)
        self.thread.start()

    def __call__(self, item: handover.Handover) -> None:
        if not hasattr(self.held, "items"):
            self.held.items = []
        self.held.items.append(item)

    def flush(self) -> None:
        for item in getattr(self.held, "items", []):
            self.queue.put(item)
        self.held.items = []

    def resume(self) -> int:
        """What an earlier agent left pending (it died, or stopped, before moving them)."""
        items = handover.pending()
        for item in items:
            self.queue.put(item)
        return len(items)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                handover.run(item)
            except Exception as exc:  # noqa: BLE001 (the thread must live on; the record stays pending)
                print(f"bwplugin agent: moving attachment {item.attach_id} to TCX failed: {exc}", file=sys.stderr,
                      flush=True)  # fmt: skip

    def stop(self) -> None:
        """Finish the item in progress; what is still queued stays pending for the next start."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put(None)
        self.thread.join()


def sweep_orphans() -> int:
    with Netlink() as nl:
        orphans = gc.orphan_ifbs(nl)
        for link in orphans:
            gc.delete_ifb_if_same(nl, link)
    return len(orphans)


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a dead agent is removed; a live agent's is not."""
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise SystemExit(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise SystemExit(f"another bwplugin agent is already serving {path}")


class AgentMetrics:
    """/metrics: every attachment's counters (read from the kernel at each scrape)
    and the agent's own requests, served by prometheus_client."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram  # only with --metrics-address

        from ..commands.stats import NodeCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector())  # type: ignore[arg-type]
        self.requests = Counter(
            "bwplugin_agent_requests", "CNI requests the agent answered.", ["command", "code"], registry=self.registry
        )
        self.seconds = Histogram(
            "bwplugin_agent_request_seconds", "Time the agent took to answer an ADD or DEL.", ["command"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=self.registry,
        )  # fmt: skip
        self.live_changes = Counter(
            "bwplugin_agent_live_changes", "Live changes the agent applied (bwplugin set, the annotation watch).",
            ["origin"], registry=self.registry,
        )  # fmt: skip
        self.watch = {
            "events": Counter("bwplugin_agent_watch_events", "Pod watch events received.", ["type"],
                              registry=self.registry),
            "errors": Counter("bwplugin_agent_watch_errors", "Pod watch failures (410 Gone, connection, API, "
                              "annotation).", ["reason"], registry=self.registry),
            "lists": Counter("bwplugin_agent_watch_lists", "Times the watch listed the node's pods.",
                             registry=self.registry),
        }  # fmt: skip

    def count(self, metric: str, label: str) -> None:
        """The annotation watch's counts ("applied" is counted as a live change)."""
        if metric == "lists":
            self.watch["lists"].inc()
        elif metric in self.watch:
            self.watch[metric].labels(label).inc()

    def observe(self, command: str, out: dict[str, Any] | None, seconds: float) -> None:
        code = str(out.get("code", 0)) if out and "code" in out else "0"
        self.requests.labels(command=command or "?", code=code).inc()
        if command in ("ADD", "DEL"):
            self.seconds.labels(command=command).observe(seconds)
        if command == "SET" and out and out.get("changed"):
            self.live_changes.labels(origin=str(out.get("origin", "cli"))).inc()

    def serve(self, address: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)


def start_watch(node: str, kubeconfig: str | None, metrics: AgentMetrics | None) -> tuple[PodWatcher, threading.Thread]:
    """The annotation watch, in a thread of its own, applying changes through the
    same call the socket's `bwplugin set` requests take."""
    from .watch import PodWatcher

    def apply(request: bytes) -> tuple[int, dict[str, Any]]:
        start = time.perf_counter()
        code, out = cli.run_set(request)
        if metrics is not None:
            metrics.observe("SET", out, time.perf_counter() - start)
        return code, out

    def log(msg: str) -> None:
        print(f"bwplugin agent: {msg}", file=sys.stderr, flush=True)

    watcher = PodWatcher(node, apply, log, metrics.count if metrics else lambda _m, _l: None, kubeconfig)
    thread = threading.Thread(target=watcher.run, name="bwplugin-pod-watch", daemon=True)
    thread.start()
    return watcher, thread


def serve(
    path: Path,
    ready: threading.Event | None = None,
    metrics_address: str | None = None,
    watch_node: str | None = None,
    kubeconfig: str | None = None,
) -> None:
    if not path.parent.exists():
        # a directory of our own, root only; an existing one (say /run) is left as it is
        path.parent.mkdir(parents=True)
        os.chmod(path.parent, 0o700)
    _remove_stale_socket(path)
    swept = sweep_orphans()  # before serving: the socket appearing means ready
    metrics = AgentMetrics() if metrics_address else None
    if metrics is not None and metrics_address:
        metrics.serve(metrics_address)
    old_umask = os.umask(0o177)
    try:
        server = Server(str(path), metrics)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)  # root only: CNI requests change the node's network

    def stop(_signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    releaser = Releaser()
    delete.ifb_releaser = releaser
    delete.link_releaser = releaser
    mover = server.mover = Mover()
    add.tcx_handover = mover
    resumed = mover.resume()
    watcher = None
    if watch_node:
        watcher, server.watch_thread = start_watch(watch_node, kubeconfig, metrics)
    print(f"bwplugin agent: serving {path} (pid {os.getpid()}), swept {swept} orphan ifb(s), resumed {resumed} "
          "handover(s) to TCX", file=sys.stderr, flush=True)  # fmt: skip
    if ready:
        ready.set()
    try:
        server.serve_forever()
    finally:
        # stop accepting (clients not yet accepted fail, and their runtimes retry),
        # let the requests in flight finish, then release the ifbs they left
        if watcher is not None:
            watcher.stop.set()
        server.server_close()
        if path.exists():
            path.unlink()
        stuck = server.wait_idle(DRAIN_TIMEOUT)
        add.tcx_handover = None
        mover.stop()
        delete.ifb_releaser = None
        delete.link_releaser = None
        releaser.drain()
        print(f"bwplugin agent: stopped ({stuck} request(s) still running)", file=sys.stderr, flush=True)


def probe_health(path: Path, want: str) -> int:
    """The kubelet's exec probe: one health request over the agent's socket."""
    from .client import exchange

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HEALTH_TIMEOUT)
    try:
        sock.connect(str(path))
        code, out, err = exchange(sock, {OP: "health"}, b"")
        report = json.loads(out) if code == 0 else {}
    except (OSError, ValueError) as exc:
        print(f"bwplugin agent at {path}: not live ({exc})", file=sys.stderr)
        return 1
    print(json.dumps(report))
    if err:
        sys.stderr.write(err.decode(errors="replace"))
    return 0 if report.get(want) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, default=Path(os.environ.get("BWPLUGIN_AGENT_SOCKET", DEFAULT_SOCKET)))
    parser.add_argument(
        "--metrics-address", metavar="HOST:PORT",
        help="serve Prometheus /metrics there (off by default; the agent runs in the host netns, so keep it local)",
    )  # fmt: skip
    parser.add_argument(
        "--watch-pods", action="store_true",
        help="apply changed bandwidth annotations of this node's pods live (needs the `kubernetes` package and "
        "API access: list and watch pods)",
    )  # fmt: skip
    parser.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME", ""),
        help="this node's name, for --watch-pods (default: $NODE_NAME, from the downward API)",
    )  # fmt: skip
    parser.add_argument("--kubeconfig", help="for --watch-pods: a kubeconfig file (default: in-cluster config)")
    parser.add_argument(
        "--health", choices=("live", "ready"),
        help="do not serve: ask the agent at --socket and exit 0 if it is live (answers) or ready (can shape pods, "
        "as STATUS says); for the DaemonSet's probes",
    )  # fmt: skip
    args = parser.parse_args()
    if args.health:
        return probe_health(args.socket, args.health)
    if args.watch_pods and not args.node_name:
        parser.error("--watch-pods needs --node-name or $NODE_NAME")
    if args.watch_pods:
        try:
            import kubernetes  # noqa: F401 (checked here, so a missing client stops the start, not a thread)
        except ImportError:
            parser.error("--watch-pods needs the `kubernetes` package (Debian: python3-kubernetes; pip: kubernetes)")
    serve(args.socket, metrics_address=args.metrics_address, watch_node=args.node_name if args.watch_pods else None,
          kubeconfig=args.kubeconfig)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
