"""The thin plugin executable: forwards the CNI request to the node agent when
one listens, else runs the plugin in this process.

Start-up is the cost here (the Go plugin's whole ADD takes ~7 ms), so until it
must fall back this imports nothing the interpreter has not already loaded but
the C module _socket: `import socket` (enum) and `import json` (re) would add
~10 ms. Requests and replies are length-prefixed bytes, not JSON:

    request:  b"<env bytes> <stdin bytes>\\n" + env (KEY=VALUE\\0 ...) + stdin
    reply:    b"<exit code> <stdout bytes> <stderr bytes>\\n" + stdout + stderr
"""

from __future__ import annotations

import _socket
import os
import sys

DEFAULT_SOCKET = "/run/bwplugin/agent.sock"
FORWARDED = ("CNI_",)  # the CNI protocol only: the agent's settings are its own
OP = "BWPLUGIN_OP"  # the one other key a request may carry: "set", a live change
TRY_AGAIN = 11  # CNI "try again later"
AF_UNIX, SOCK_STREAM, SHUT_WR = 1, 1, 1


def encode_request(env: dict[str, str], stdin: bytes) -> bytes:
    block = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return b"%d %d\n" % (len(block), len(stdin)) + block + stdin


def decode_reply(data: bytes) -> tuple[int, bytes, bytes]:
    head, _, rest = data.partition(b"\n")
    code, out_len, err_len = (int(x) for x in head.split())
    if len(rest) != out_len + err_len:
        raise ValueError(f"truncated reply ({len(rest)} of {out_len + err_len} bytes)")
    return code, rest[:out_len], rest[out_len:]


def _connect() -> _socket.socket | None:
    if os.environ.get("BWPLUGIN_NO_AGENT") == "1":
        return None
    sock = _socket.socket(AF_UNIX, SOCK_STREAM)
    try:
        sock.connect(os.environ.get("BWPLUGIN_AGENT_SOCKET", DEFAULT_SOCKET))
    except OSError:
        sock.close()
        return None  # no agent: do the work here
    return sock


def _agent_failed(stdin: bytes, exc: Exception) -> int:
    """The agent went away mid-request: what it did is unknown, so do not redo it
    here; the runtime retries (after a DEL for an ADD), which converges."""
    import json

    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        version = None
    err = {
        "cniVersion": version if isinstance(version, str) else "1.1.0",
        "code": TRY_AGAIN,
        "msg": f"bwplugin agent failed during {os.environ.get('CNI_COMMAND', '?')}: {exc}",
    }
    sys.stdout.write(json.dumps(err) + "\n")
    return 1


def exchange(sock: _socket.socket, env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    try:
        sock.sendall(encode_request(env, stdin))
        sock.shutdown(SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return decode_reply(b"".join(chunks))
    finally:
        sock.close()


def forward(sock: _socket.socket, stdin: bytes) -> int:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    try:
        code, out, err = exchange(sock, env, stdin)
    except (OSError, ValueError) as exc:
        return _agent_failed(stdin, exc)
    if err:
        sys.stderr.buffer.write(err)
    if out:
        sys.stdout.buffer.write(out)
    return code


def live_set(argv: list[str]) -> int:
    """`bwplugin set`: through the agent when one listens (it also serves the
    annotation watch, and counts the change), else in this process."""
    import json

    from bwplugin import cli

    request, as_json = cli.set_request(argv)
    sock = _connect()
    if sock is None:
        return cli.print_set(*cli.run_set(request), as_json)
    try:
        code, out, err = exchange(sock, {OP: "set"}, request)
    except (OSError, ValueError) as exc:
        print(f"bwplugin set: the agent failed: {exc}; nothing is known to have changed", file=sys.stderr)
        return 1
    sys.stderr.buffer.write(err)
    return cli.print_set(code, json.loads(out), as_json)


def main() -> int:
    if len(sys.argv) > 1:  # runtimes pass no arguments; people run `bwplugin stats` or `set`
        if sys.argv[1] == "set":
            return live_set(sys.argv[2:])
        from bwplugin.cli import tool

        return tool(sys.argv[1:])
    stdin = sys.stdin.buffer.read()
    sock = _connect()
    if sock is not None:
        return forward(sock, stdin)
    from bwplugin.cli import main as in_process

    return in_process(stdin)
