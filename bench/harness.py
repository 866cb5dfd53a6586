"""One lab holding an unshaped peer pod, and fresh pods shaped by either plugin."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.lab.lab import Lab, Pod
from bench.lab.lab import runtime_bandwidth as bandwidth

PLUGINS = {
    "bwplugin": {"type": "bwplugin", "capabilities": {"bandwidth": True}},
    "reference": {"type": "bandwidth", "capabilities": {"bandwidth": True}},  # Debian's Go plugin
}
# /20: room for the cost section run with --background 2000 (pods of each plugin)
SUBNETS = {
    "peer": "10.234.0.0/24",
    "bwplugin": "10.234.16.0/20",
    "reference": "10.234.32.0/20",
    "none": "10.234.48.0/24",  # pods with no shaper: the datapath section's baseline
}
CRIO_BURST = 34359738359
MEASURE_PORT, LOAD_PORT = 5201, 5202


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Shaped:
    pod: Pod
    veth: str  # host side: carries the ingress TBF
    ifb: str | None  # carries the egress TBF

    def device(self, direction: str) -> str:
        dev = self.veth if direction == "ingress" else self.ifb
        assert dev is not None
        return dev


class Bench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.count = 0
        self.conflists = {
            name: lab.conflist(conf, name=f"bwpt-{name}", subnet=SUBNETS[name]) for name, conf in PLUGINS.items()
        }
        # no shaper in the chain: the datapath section's baseline (`shaped("none")`)
        self.conflists["none"] = lab.conflist(None, name="bwpt-none", subnet=SUBNETS["none"])
        self.peer = lab.pod("peer")
        lab.attach(self.peer, lab.conflist(None, name="bwpt-peer", subnet=SUBNETS["peer"]))
        lab.iperf_server(self.peer, MEASURE_PORT)
        lab.iperf_server(self.peer, LOAD_PORT)

    def add(self, plugin: str, runtime_config: dict[str, Any] | None, static: dict[str, Any] | None = None) -> Shaped:
        """A fresh pod shaped by `plugin` ("none": a chain with no shaper); `static`
        adds keys to its plugin config."""
        self.count += 1
        pod = self.lab.pod(f"{plugin[:3]}{self.count}")
        conflist = self.conflists[plugin]
        if static:
            conflist = {**conflist, "plugins": [conflist["plugins"][0], {**conflist["plugins"][1], **static}]}
        att = self.lab.attach(pod, conflist, runtime_config)
        ifaces = att.result["interfaces"] if att.result else []
        veth = next(i["name"] for i in ifaces if i["name"].startswith("veth"))
        ifb = next((i["name"] for i in ifaces if i["name"].startswith("bwp")), None)
        return Shaped(pod, veth, ifb)

    def shaped(self, plugin: str, **bw: int) -> contextlib.AbstractContextManager[Shaped]:
        return self.shaped_with(plugin, None, **bw)

    @contextlib.contextmanager
    def shaped_with(self, plugin: str, static: dict[str, Any] | None, **bw: int) -> Iterator[Shaped]:
        shaped = self.add(plugin, bandwidth(**bw) if bw else None, static)  # no rates: no runtimeConfig
        try:
            yield shaped
        finally:
            self.lab.remove_pod(shaped.pod)

    def iperf(self, pod: Pod, **kw: Any) -> dict[str, Any]:
        """iperf3 to the peer's measurement server (lab.iperf retries a busy server)."""
        return self.lab.iperf(pod, self.peer, port=MEASURE_PORT, **kw)


def rotated(names: tuple[str, ...], i: int) -> tuple[str, ...]:
    """The i-th rotation: who goes first changes from point to point, so that drift
    in machine load hits every variant alike."""
    k = i % len(names)
    return names[k:] + names[:k]


def order(i: int) -> tuple[str, ...]:
    """The two plugins, alternating which goes first."""
    return rotated(tuple(PLUGINS), i)
