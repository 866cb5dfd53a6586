"""Per-request settings and log lines.

In-process, a setting is an environment variable. In the agent, each request
carries its own BWPLUGIN_* variables and collects its own log lines (returned to
the client, whose stderr the runtime keeps), so concurrent requests never see
each other's."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

_request_env: ContextVar[Mapping[str, str] | None] = ContextVar("bwplugin_request_env", default=None)
_request_log: ContextVar[list[str] | None] = ContextVar("bwplugin_request_log", default=None)


def get(name: str, default: str | None = None) -> str | None:
    env = _request_env.get()
    if env is not None and name in env:
        return env[name]
    return os.environ.get(name, default)


def log(msg: str) -> None:
    line = f"bwplugin: {msg}"
    lines = _request_log.get()
    if lines is not None:
        lines.append(line)
    else:
        print(line, file=sys.stderr)


@contextmanager
def request(env: Mapping[str, str], log_lines: list[str]) -> Iterator[None]:
    env_token = _request_env.set(env)
    log_token = _request_log.set(log_lines)
    try:
        yield
    finally:
        _request_env.reset(env_token)
        _request_log.reset(log_token)
