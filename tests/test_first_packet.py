"""The README's headline: the configured rate from the first packet. Measured where
a user feels it, at the receiver: its interface's RX byte counter, sampled every
~2 ms with pyroute2 (no bwplugin code) from the moment the first bytes arrive.

The runtimes send huge bursts (containerd 2^32-1 bits, CRI-O 34359738359 bits);
the reference plugin turns them into a bucket of that size, so a pod's first
seconds run at veth speed. bwplugin caps the bucket at rate x maxBurstMs (10 ms by
default), so the first 100 ms may carry at most 110 ms worth of the rate. The
expected values below are written out from the rate, not computed by bwplugin."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from bench.lab.lab import Lab, Pod

from .conftest import bandwidth, host_veth, shaper
from .oracle import after_handover

pytestmark = pytest.mark.kernel

RATE = 20_000_000  # bits/s, both directions: 2,500,000 B/s
PER_100MS = 250_000  # B the rate allows in 100 ms
BUCKET = 25_000  # B: 10 ms of the rate, the default maxBurstMs cap
PER_SECOND = 2_500_000
FRAME = 1514
BURSTS = {"containerd": 4294967295, "cri-o": 34359738359}


class RxTimeline:
    """(monotonic time, RX bytes) of one interface in a netns, sampled on a thread."""

    def __init__(self, netns: str, dev: str, interval: float = 0.002) -> None:
        self.netns, self.dev, self.interval = netns, dev, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        with IPRoute(netns=self.netns) as ipr:
            index = ipr.link_lookup(ifname=self.dev)[0]
            self._ready.set()
            while not self._stop.is_set():
                stats = ipr.link("get", index=index)[0].get_attr("IFLA_STATS64")
                self.samples.append((time.monotonic(), int(stats["rx_bytes"])))
                time.sleep(self.interval)

    def __enter__(self) -> RxTimeline:
        self._thread.start()
        assert self._ready.wait(10), "the RX sampler did not start"
        time.sleep(0.05)  # a baseline before the flow
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def received_within(self, seconds: float, threshold: int = 3 * FRAME) -> int:
        """Bytes received in the first `seconds` after the flow's first bytes (the
        first sample `threshold` above the baseline, so stray ARP does not count)."""
        base = self.samples[0][1]
        start = next(i for i, (_, b) in enumerate(self.samples) if b - base > threshold)
        t0, b0 = self.samples[start - 1]  # the last sample before the flow arrived
        inside = [(t, b) for t, b in self.samples[start:] if t - t0 <= seconds]
        assert inside and self.samples[-1][0] - t0 > seconds, "the flow ended before the window"
        return inside[-1][1] - b0


@pytest.fixture(params=["in-process", "agent"])
def pods(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, Pod, Pod]]:
    with Lab(agent=request.param == "agent") as lab:
        peer, pod = lab.pod("peer"), lab.pod("first")
        lab.attach(peer, lab.conflist(shaper()))
        yield lab, peer, pod


@pytest.mark.parametrize("runtime", BURSTS)
@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_the_first_100_ms_and_the_first_second_hold_the_rate(
    pods: tuple[Lab, Pod, Pod], runtime: str, direction: str
) -> None:
    lab, peer, pod = pods
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=RATE, egress=RATE, burst=BURSTS[runtime]))
    # the agent's move to TCX links, ~40 ms after ADD: with the move delayed into the
    # flow's first 100 ms, 2 of 33 runs read 14 % low or high (a CI run once, 65 %
    # low); whether the kernel or the 2-CPU VM's contention: see docs/design.md
    after_handover(lab.node, host_veth(pod, att.result), through_agent=lab.agent is not None)
    lab.iperf_server(peer)
    receiver = peer if direction == "egress" else pod
    with RxTimeline(receiver.netns, "eth0") as rx:  # UDP at 3x the rate keeps the shaper backlogged
        lab.iperf(pod, peer, seconds=1.5, omit=0, reverse=direction == "ingress", udp_rate=3 * RATE)
    first_100ms, first_second = rx.received_within(0.1), rx.received_within(1.0)
    # never more than the rate plus one bucket, and not starved either
    assert 0.9 * PER_100MS <= first_100ms <= PER_100MS + BUCKET + 2 * FRAME, (direction, runtime, first_100ms)
    assert 0.97 * PER_SECOND <= first_second <= PER_SECOND + BUCKET + 2 * FRAME, (direction, runtime, first_second)
