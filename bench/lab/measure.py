"""Rates on the wire, from the shaping qdisc's own byte counters.

iperf3 goodput is at most ~95.6% of the wire rate for TCP (1448 of 1514 bytes
per frame), so accuracy is judged on the bytes the TBF actually sent, sampled
while the flow runs with pyroute2: a netlink implementation that shares no code
with bwplugin's, so the tests and the bench do not grade its own homework."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

TC_H_ROOT = 0xFFFFFFFF

TCP_GOODPUT_CEILING = 1448 / 1514  # MSS with timestamps / Ethernet frame
UDP_GOODPUT_CEILING = 1400 / (1400 + 8 + 20 + 14)  # iperf3 -l 1400 payload / frame


@dataclass
class Sampler:
    """Samples the root qdisc's sent-bytes of `devices` (in netns `netns`)."""

    netns: str
    devices: list[str]
    interval: float = 0.1
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ipr = IPRoute(netns=self.netns)
        self._index = {}
        for dev in self.devices:
            found = self._ipr.link_lookup(ifname=dev)
            if not found:
                self._ipr.close()
                raise LookupError(f"device {dev} not found in {self.netns}")
            self._index[dev] = found[0]
            self.samples[dev] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _root_bytes(self, index: int) -> int:
        for q in self._ipr.get_qdiscs(index=index):
            if q["index"] == index and q["parent"] == TC_H_ROOT:
                stats = q.get_attr("TCA_STATS2")
                basic = stats.get_attr("TCA_STATS_BASIC") if stats else None
                return int(basic["bytes"]) if basic else 0
        return 0

    def _sample(self) -> None:
        now = time.monotonic()
        for dev, index in self._index.items():
            self.samples[dev].append((now, self._root_bytes(index)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._ipr.close()

    def bytes_between(self, dev: str, start: float, end: float) -> tuple[int, float]:
        """Bytes sent between t0+start and t0+end (nearest samples) and the exact span."""
        pts = self.samples[dev]
        a = min(pts, key=lambda p: abs(p[0] - (self.t0 + start)))
        b = min(pts, key=lambda p: abs(p[0] - (self.t0 + end)))
        return b[1] - a[1], b[0] - a[0]

    def rate(self, dev: str, start: float, end: float) -> float:
        """Average bits/s on the wire between two offsets from t0."""
        nbytes, span = self.bytes_between(dev, start, end)
        return nbytes * 8 / span if span > 0 else 0.0

    def active(self, dev: str) -> tuple[float, float]:
        """Offsets from t0 of the first and last sample in which bytes moved."""
        pts = self.samples[dev]
        moving = [pts[i][0] for i in range(1, len(pts)) if pts[i][1] > pts[i - 1][1]]
        if not moving:
            return 0.0, 0.0
        return moving[0] - self.t0, moving[-1] - self.t0

    def steady_rate(self, dev: str, skip: float = 1.0, tail: float = 0.3) -> float:
        """Bits/s from `skip` s after the flow started to `tail` s before it ended."""
        first, last = self.active(dev)
        if last - tail - (first + skip) < 0.5:  # a short flow: use all of it
            return self.rate(dev, first, last)
        return self.rate(dev, first + skip, last - tail)

    def per_second(self, dev: str, start: float, end: float) -> list[float]:
        return [self.rate(dev, s, s + 1) for s in range(int(start), int(end))]


def iperf_goodput(result: dict[str, Any]) -> float:
    """Receiver-side bits/s over the measured part (run iperf3 with -O to omit
    slow start). UDP: what was sent less what was lost."""
    end = result["end"]
    if "sum_received" in end:  # TCP
        return float(end["sum_received"]["bits_per_second"])
    udp = end["sum"]
    return float(udp["bits_per_second"]) * (1 - float(udp.get("lost_percent", 0.0)) / 100)
