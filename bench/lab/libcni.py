"""Runs a conflist's plugins as a runtime does, for the demo, the tests and the
benchmarks, optionally inside a given netns (the lab's node).

Two ways:
- **the real libcni** (`Runtime.driver`: bench/lab/cnidriver, a small Go program
  on Debian's libcni 1.1.2), which the tests use: libcni builds every plugin's
  config (the list's cniVersion forced on each, runtimeConfig only for declared
  capabilities), converts and caches results, sends CHECK and DEL the cached
  result (none on DEL before 0.4.0) and stops DEL at the first failing plugin;
- **an emulation** of the same, where that libcni cannot serve: lists of CNI
  1.1.0 (libcni 1.1.2 predates it, and has no GC or STATUS at all), a test
  acting between two plugins of one ADD (`between`), and the benchmarks (no Go
  toolchain needed). It differs from libcni: a plugin's own cniVersion wins, DEL
  goes on past a failing plugin and raises the first failure at the end.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bwplugin.cni.protocol import convert_result
from bwplugin.datapath.netlink import CLONE_NEWNET


class PluginFailed(Exception):
    def __init__(self, plugin: str, command: str, rc: int, error: dict[str, Any] | None, stderr: str) -> None:
        super().__init__(f"{plugin} {command} failed (exit {rc}): {error or stderr}")
        self.plugin, self.command, self.rc, self.error, self.stderr = plugin, command, rc, error, stderr


@dataclass
class Invocation:
    rc: int
    stdout: str
    stderr: str
    seconds: float  # wall time, exec to exit
    cpu_seconds: float = 0.0  # user + system time of the plugin process

    @property
    def json(self) -> dict[str, Any] | None:
        return json.loads(self.stdout) if self.stdout.strip() else None


def _enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {path}")
    os.close(fd)


LIBCNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")  # what Debian's libcni 1.1.2 runs
DRIVER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cnidriver")


def build_driver(out_dir: str) -> str:
    """bench/lab/cnidriver built against Debian's libcni (golang-github-appc-cni-dev)."""
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    out = os.path.join(out_dir, "cnidriver")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": os.path.join(out_dir, "cache")}
    proc = subprocess.run([go, "build", "-o", out, "."], cwd=DRIVER_SOURCE, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the libcni driver failed: {proc.stderr.strip()}")
    shutil.rmtree(env["GOCACHE"], ignore_errors=True)
    return out


@dataclass
class Runtime:
    cni_path: list[str]
    node_netns: str | None = None  # run plugins in this netns (the "host" they see)
    extra_env: dict[str, str] = field(default_factory=dict)
    driver: str | None = None  # the real libcni (build_driver); None: the emulation
    cache_dir: str = ""  # the real libcni's result cache (its default is /var/lib/cni)

    def base_env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **self.extra_env}

    def run_in_node(
        self, argv: list[str], data: bytes, environ: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[bytes]:
        """A process in the node netns (if there is one), fed `data` on stdin."""
        node = self.node_netns
        return subprocess.run(
            argv, input=data, capture_output=True, env=environ, timeout=timeout,
            preexec_fn=(lambda: _enter_netns(node)) if node else None,
        )  # fmt: skip

    def find(self, plugin_type: str) -> str:
        for d in self.cni_path:
            candidate = os.path.join(d, plugin_type)
            if os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"plugin {plugin_type!r} not found in {self.cni_path}")

    def exec(
        self,
        plugin_type: str,
        command: str,
        conf: dict[str, Any] | bytes,
        *,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        args: str = "",
        env: dict[str, str] | None = None,
    ) -> Invocation:
        environ = {**self.base_env(), "CNI_COMMAND": command, "CNI_PATH": ":".join(self.cni_path), **(env or {})}
        for key, value in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname)):
            if value:
                environ[key] = value
        if args:
            environ["CNI_ARGS"] = args
        data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = self.run_in_node([self.find(plugin_type)], data, environ, timeout=120)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # exact while calls are sequential
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return Invocation(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), elapsed, cpu)


def plugin_conf(
    conflist: dict[str, Any],
    plugin: dict[str, Any],
    prev: dict[str, Any] | None,
    runtime_config: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
    conf.pop("capabilities", None)
    caps = plugin.get("capabilities", {})
    rc = {k: v for k, v in (runtime_config or {}).items() if caps.get(k)}
    if rc:
        conf["runtimeConfig"] = rc
    if prev is not None:  # libcni hands each plugin the result in its own version
        conf["prevResult"] = convert_result(prev, conf["cniVersion"])
    conf.update(extra or {})
    return conf


@dataclass
class Attachment:
    """One (container, ifname) attached through a conflist, as libcni caches it."""

    runtime: Runtime
    conflist: dict[str, Any]
    container_id: str
    netns: str
    ifname: str = "eth0"
    runtime_config: dict[str, Any] | None = None
    args: list[tuple[str, str]] = field(default_factory=list)  # CNI_ARGS, as K=V pairs
    result: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)  # "<type>:<command>" -> the plugin's stderr
    emulated: bool = False  # set once a command of this attachment ran through the emulation

    @property
    def real(self) -> bool:
        """Whether the real libcni runs this attachment's commands."""
        return bool(self.runtime.driver) and self.conflist["cniVersion"] in LIBCNI_VERSIONS and not self.emulated

    def _drive(self, op: str) -> dict[str, Any] | None:
        """One command of the whole list through the real libcni."""
        request = {
            "conflist": self.conflist,
            "containerID": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "args": [list(a) for a in self.args],
            "capabilityArgs": self.runtime_config or {},
            "cacheDir": self.runtime.cache_dir,
            "path": self.runtime.cni_path,
        }
        rt, driver = self.runtime, self.runtime.driver
        assert driver
        proc = rt.run_in_node([driver, op], json.dumps(request).encode(), rt.base_env(), timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"cnidriver {op}: exit {proc.returncode}: {proc.stderr.decode()[-2000:]}")
        report = json.loads(proc.stdout)
        for c in report["calls"]:
            key = f"{c['plugin']}:{c['command']}"
            self.timings[key], self.timings[f"{key}:cpu"] = c["seconds"], c["cpuSeconds"]
            self.logs[key] = c["stderr"]
        if report["text"]:
            failed = next((c for c in reversed(report["calls"]) if c["rc"] != 0), None)
            if failed is None:  # libcni itself refused (no plugin failed)
                raise PluginFailed("libcni", op.upper(), 0, {"msg": report["text"]}, "")
            raise PluginFailed(failed["plugin"], failed["command"], failed["rc"], report["error"], failed["stderr"])
        result = report["result"]
        return result if isinstance(result, dict) else None

    def _run(self, plugin: dict[str, Any], command: str, prev: dict[str, Any] | None) -> Invocation:
        self.emulated = True
        conf = plugin_conf(self.conflist, plugin, prev, self.runtime_config)
        cni_args = ";".join(f"{k}={v}" for k, v in self.args)
        inv = self.runtime.exec(
            plugin["type"], command, conf, container_id=self.container_id, netns=self.netns, ifname=self.ifname,
            args=cni_args,
        )  # fmt: skip
        self.timings[f"{plugin['type']}:{command}"] = inv.seconds
        self.timings[f"{plugin['type']}:{command}:cpu"] = inv.cpu_seconds
        self.logs[f"{plugin['type']}:{command}"] = inv.stderr
        if inv.rc != 0:
            raise PluginFailed(plugin["type"], command, inv.rc, _maybe_json(inv.stdout), inv.stderr)
        return inv

    def add(self, between: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """ADD down the chain. `between` runs after each plugin but the last, with
        the result so far: another tool acting while the runtime works through the list
        (which the real libcni cannot do: such an ADD is emulated)."""
        if self.real and between is None:
            self.result = self._drive("add")
            return self.result or {}
        prev = None
        for i, plugin in enumerate(self.conflist["plugins"]):
            prev = self._run(plugin, "ADD", prev).json
            if between is not None and prev is not None and i < len(self.conflist["plugins"]) - 1:
                between(prev)
        self.result = prev
        return prev or {}

    def check(self) -> None:
        if self.real:
            self._drive("check")
            return
        for plugin in self.conflist["plugins"]:
            self._run(plugin, "CHECK", self.result)

    def delete(self) -> None:
        """DEL in reverse order. Real libcni stops at the first failing plugin; the
        emulation keeps going and raises the first failure at the end."""
        if self.real:
            self._drive("del")
            return
        first: PluginFailed | None = None
        for plugin in reversed(self.conflist["plugins"]):
            try:
                self._run(plugin, "DEL", self.result)
            except PluginFailed as exc:
                first = first or exc
        if first:
            raise first


def _maybe_json(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
