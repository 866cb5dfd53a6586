"""The README's headline: the configured rate from the first packet. Measured where
a user feels it, at the receiver: its interface's RX byte counter, sampled every
~2 ms from /proc/PID/net/dev of a sleeper in its netns (no bwplugin code) from the
moment the first bytes arrive. Not over netlink: RTM_GETLINK waits for the rtnl lock,
which a TCX attach anywhere on the node holds through an RCU grace period, so a
netlink sampler stalled up to 50 ms and read a window 36 % short (docs/design.md).

The runtimes send huge bursts (containerd 2^32-1 bits, CRI-O 34359738359 bits);
the reference plugin turns them into a bucket of that size, so a pod's first
seconds run at veth speed. bwplugin caps the bucket at rate x maxBurstMs (10 ms by
default), so the first 100 ms may carry at most 110 ms worth of the rate. The
expected values below are written out from the rate, not computed by bwplugin."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

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

    def __init__(self, lab: Lab, netns: str, dev: str, interval: float = 0.002) -> None:
        self.lab, self.netns, self.dev, self.interval = lab, netns, dev, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sleeper: subprocess.Popen[bytes] | None = None

    def _rx_bytes(self, path: str) -> int:
        with open(path) as f:
            for line in f:
                name, _, counters = line.partition(":")
                if name.strip() == self.dev:
                    return int(counters.split()[0])
        raise AssertionError(f"no {self.dev} in {path}")

    def _run(self) -> None:
        assert self._sleeper is not None
        path = f"/proc/{self._sleeper.pid}/net/dev"  # the sleeper's netns, read under RCU only
        while not self._stop.is_set():
            rx = self._rx_bytes(path)
            self.samples.append((time.monotonic(), rx))
            time.sleep(self.interval)

    def __enter__(self) -> RxTimeline:
        # the lab's process: killed with the lab, also when this fails before __exit__
        self._sleeper = self.lab.spawn(self.netns, "bash", "-c", "exec -a bwpt-rx-sampler sleep 600")
        deadline, target = time.monotonic() + 10, os.stat(self.netns).st_ino
        while os.stat(f"/proc/{self._sleeper.pid}/ns/net").st_ino != target:  # nsenter's setns done
            assert time.monotonic() < deadline, "the RX sampler's sleeper did not enter the netns"
            time.sleep(0.01)
        self._thread.start()
        time.sleep(0.05)  # a baseline before the flow
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._sleeper is not None:
            self._sleeper.kill()
            self._sleeper.wait()

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
    # flow's first 100 ms, this sampler read 0.884-1.090 of the rate in 30 runs, 1 of
    # them under 0.9 (docs/design.md); a pod's first packet comes later than that
    after_handover(lab.node, host_veth(pod, att.result), through_agent=lab.agent is not None)
    lab.iperf_server(peer)
    receiver = peer if direction == "egress" else pod
    with RxTimeline(lab, receiver.netns, "eth0") as rx:  # UDP at 3x the rate keeps the shaper backlogged
        lab.iperf(pod, peer, seconds=1.5, omit=0, reverse=direction == "ingress", udp_rate=3 * RATE)
    first_100ms, first_second = rx.received_within(0.1), rx.received_within(1.0)
    # never more than the rate plus one bucket, and not starved either
    assert 0.9 * PER_100MS <= first_100ms <= PER_100MS + BUCKET + 2 * FRAME, (direction, runtime, first_100ms)
    assert 0.97 * PER_SECOND <= first_second <= PER_SECOND + BUCKET + 2 * FRAME, (direction, runtime, first_second)
