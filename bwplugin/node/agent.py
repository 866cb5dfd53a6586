"""The resident node agent: serves CNI requests forwarded by the thin client
(bwplugin/node/client.py) over a root-only unix socket, with everything already
imported and the pinned program's path computed. It runs the very same
cli.run() as the in-process path, so results and error codes are identical.

It keeps no state of its own: the kernel (links, qdiscs, filters) and bpffs
(program, attach map) are the source of truth, so it can be killed and
restarted at any time. It must run in the host network namespace."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import socketserver
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import cli
from ..cni import settings
from ..commands import delete, gc
from ..datapath.netlink import Link, Netlink
from .client import DEFAULT_SOCKET, FORWARDED

MAX_HEADER = 64  # bytes of the "<env> <stdin>" length line
MAX_BODY = 16 << 20


def decode_request(head: bytes, read: Callable[[int], bytes]) -> tuple[dict[str, str], bytes]:
    env_len, stdin_len = (int(x) for x in head.split())
    if not (0 <= env_len <= MAX_BODY and 0 <= stdin_len <= MAX_BODY):
        raise ValueError("request too large")
    block, stdin = read(env_len), read(stdin_len)
    if len(block) != env_len or len(stdin) != stdin_len:
        raise ValueError("truncated request")
    env = {}
    for item in block.split(b"\0"):
        key, sep, value = item.decode().partition("=")
        if sep and key.startswith(FORWARDED):
            env[key] = value
    return env, stdin


def encode_reply(code: int, out: dict[str, Any] | None, log: list[str]) -> bytes:
    body = (json.dumps(out) + "\n").encode() if out is not None else b""
    err = "".join(line + "\n" for line in log).encode()
    return b"%d %d %d\n" % (code, len(body), len(err)) + body + err


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        head = self.rfile.readline(MAX_HEADER)
        if not head:
            return  # a readiness probe: connected and closed
        try:
            env, stdin = decode_request(head, self.rfile.read)
        except (ValueError, UnicodeDecodeError) as exc:
            self.wfile.write(encode_reply(1, None, [f"bwplugin agent: malformed request: {exc}"]))
            return
        lines: list[str] = []
        with settings.request(env, lines):
            code, out = cli.run(env, stdin)
        self.wfile.write(encode_reply(code, out, lines))


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a stuck request must not block shutdown


class Releaser:
    """Deletes inert ifbs after DEL has answered. Drained on shutdown; what a crash
    leaves is swept at the next start (gc.orphan_ifbs) or by GC."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Link | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="bwplugin-ifb-release", daemon=True)
        self.thread.start()

    def __call__(self, ifb: Link) -> None:
        self.queue.put(ifb)

    def _run(self) -> None:
        with Netlink() as nl:
            while (ifb := self.queue.get()) is not None:
                try:
                    gc.delete_ifb_if_same(nl, ifb)
                except OSError as exc:
                    print(f"bwplugin agent: releasing ifb {ifb.name} failed: {exc}", file=sys.stderr, flush=True)

    def drain(self) -> None:
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


def serve(path: Path, ready: threading.Event | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # root only: CNI requests change the node's network
    _remove_stale_socket(path)
    swept = sweep_orphans()  # before serving: the socket appearing means ready
    old_umask = os.umask(0o177)
    try:
        server = Server(str(path), Handler)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)

    def stop(signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    releaser = Releaser()
    delete.ifb_releaser = releaser
    print(f"bwplugin agent: serving {path} (pid {os.getpid()}), swept {swept} orphan ifb(s)", file=sys.stderr,
          flush=True)  # fmt: skip
    if ready:
        ready.set()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if path.exists():
            path.unlink()
        delete.ifb_releaser = None
        releaser.drain()
        print("bwplugin agent: stopped", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, default=Path(os.environ.get("BWPLUGIN_AGENT_SOCKET", DEFAULT_SOCKET)))
    args = parser.parse_args()
    serve(args.socket)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
