"""TBF and HTB fields at their extremes on a real kernel: the slowest and fastest
rates, the largest bucket and queue. ADD makes them, CHECK accepts them, and tc(8)
(not bwplugin's netlink code) reads back what the kernel holds."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from bench.lab.lab import Lab

from .conftest import bandwidth, host_veth, shaper
from .oracle import view

pytestmark = pytest.mark.kernel

CONTAINERD_BURST = 4294967295
PBIT = 10**15


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


def tbf_of(lab: Lab, dev: str) -> dict:
    (q,) = [q for q in json.loads(lab.run(lab.node, "tc", "-j", "qdisc", "show", "dev", dev, "root").stdout)]
    return q


def htb_shaped_class(lab: Lab, dev: str) -> tuple[int, int]:
    """(rate bits/s, bucket in ticks) of class b0d0:1, from `tc -raw class show`."""
    text = lab.run(lab.node, "tc", "-raw", "class", "show", "dev", dev, "classid", "b0d0:1").stdout
    rate = re.search(r"\brate ([\d.]+)([KMGT]?)bit\b", text)
    buffer = re.search(r"\bbuffer \[([0-9a-f]+)\]", text)
    assert rate and buffer, text
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[rate.group(2)]
    return round(float(rate.group(1)) * scale), int(buffer.group(1), 16)


@pytest.mark.parametrize(
    "rate, burst, extra",
    [
        (1_000, 8, {"latencyMs": 10_000}),  # slowest rate, smallest burst, longest queue
        (PBIT, CONTAINERD_BURST, {"maxBurstMs": 60_000}),  # fastest rate (64-bit), largest bucket and queue
        (10_000_000, 8 * (2**32 - 1) - 1, {"maxBurstMs": 0}),  # the largest burst CNI allows, uncapped
    ],
)
def test_tbf_extremes_are_made_checked_and_read_back(lab: Lab, rate: int, burst: int, extra: dict) -> None:
    pod = lab.pod(f"t{len(lab.pods)}")
    conf = shaper(ingressRate=rate, ingressBurst=burst, egressRate=rate, egressBurst=burst, **extra)
    att = lab.attach(pod, lab.conflist(conf))
    att.check()
    q = tbf_of(lab, host_veth(pod))
    assert q["kind"] == "tbf" and q["options"]["rate"] == rate // 8  # 64-bit rates held exactly
    lab.remove_pod(pod)


@pytest.mark.parametrize("rate", [1_000, 10_000_000, PBIT])
def test_subnet_mode_holds_a_bucket_past_32_bits_in_its_tbf_leaf(lab: Lab, rate: int) -> None:
    """Subnet mode, containerd's burst with no maxBurstMs cap (429.5 s at 10 Mbit/s):
    the shaped class's TBF leaf takes the bucket in 64 bits (TCA_TBF_BURST), as a
    plain root TBF does, where an HTB class's u32 ticks would have to clamp it. The
    HTB over it only sorts, at 1 Tbit/s. CHECK compares what the kernel reports."""
    pod = lab.pod(f"h{len(lab.pods)}")
    conf = shaper(unshapedSubnets=["10.99.0.0/16"], maxBurstMs=0, ingressRate=rate, ingressBurst=CONTAINERD_BURST)
    att = lab.attach(pod, lab.conflist(conf))
    att.check()
    dev = host_veth(pod)
    assert htb_shaped_class(lab, dev)[0] == 10**12  # the class only sorts
    out = lab.run(lab.node, "tc", "-j", "-raw", "qdisc", "show", "dev", dev, "parent", "b0d0:1").stdout
    (leaf,) = json.loads(out)
    assert leaf["kind"] == "tbf" and leaf["handle"] == "b0d1:" and leaf["options"]["rate"] == rate // 8, leaf
    wanted = (CONTAINERD_BURST // 8) * 10**9 // (rate // 8) // 64  # the whole burst, in 64 ns ticks
    assert int(leaf["options"]["burst_raw"], 16) == wanted & (2**32 - 1), (leaf, wanted)  # the dump's u32
    lab.remove_pod(pod)


# (rate bit/s, then what the kernel must hold, worked out by hand from docs/configuration.md
# with the default policy (latencyMs 25, maxBurstMs 10) and containerd's 2^32-1-bit burst:
# bytes/s, the bucket (10 ms of the rate, at least 64 KiB above ~52 Mbit/s), the queue
# (25 ms of the rate, at least 16 frames and two GSO packets). Every bucket here is 10 ms:
# 156,250 ticks of 64 ns
READ_BACK = [
    (10_000_000, 1_250_000, 12_500, 31_250),
    (5_000_000_000, 625_000_000, 6_250_000, 15_625_000),
    (40_000_000_000, 5_000_000_000, 50_000_000, 125_000_000),  # above 2^32-1 B/s: TCA_TBF_RATE64
]


@pytest.mark.parametrize("rate, rate_bytes, bucket, limit", READ_BACK)
def test_tbf_rate_bucket_and_queue_read_back_exactly_in_both_directions(
    lab: Lab, rate: int, rate_bytes: int, bucket: int, limit: int
) -> None:
    pod = lab.pod(f"r{len(lab.pods)}")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=rate, egress=rate))
    ifb = att.result["interfaces"][-1]["name"]
    for dev in (host_veth(pod), ifb):
        (q,) = json.loads(lab.run(lab.node, "tc", "-j", "-raw", "qdisc", "show", "dev", dev, "root").stdout)
        assert q["kind"] == "tbf" and q["options"]["rate"] == rate_bytes, (dev, q)
        # the bucket as the kernel holds it, in 64 ns ticks (10 ms = 156,250; the kernel's
        # rate maths may round one down); tc's own "burst" re-derives bytes through its
        # tick rounding (6,249,375 B for 6,250,000 at 5 Gbit/s)
        assert bucket * 10**9 // rate_bytes == 10_000_000
        assert int(q["options"]["burst_raw"], 16) in (156_249, 156_250), (dev, q)
        assert q["options"]["limit"] == limit, (dev, q)
    lab.remove_pod(pod)


def test_htb_leaves_read_back_in_subnet_mode(lab: Lab) -> None:
    """Subnet mode at 10 Mbit/s: the shaped class's leaf is plain mode's TBF (25 ms
    of queue, 31,250 B: it segments GSO packets bigger than its bucket, which HTB
    does not); the unshaped class's bfifo holds 4 MiB."""
    pod = lab.pod(f"f{len(lab.pods)}")
    att = lab.attach(pod, lab.conflist(shaper(unshapedSubnets=["10.99.0.0/16"])), bandwidth(ingress=10_000_000))
    att.check()
    qdiscs = view(lab.node).qdiscs[host_veth(pod)]
    (tbf,) = [q for q in qdiscs if q["parent"] == 0xB0D00001]
    assert (tbf["kind"], tbf["rate"], tbf["limit"]) == ("tbf", 1_250_000, 31_250), tbf
    out = lab.run(lab.node, "tc", "-j", "qdisc", "show", "dev", host_veth(pod), "parent", "b0d0:2").stdout
    (fifo,) = json.loads(out)  # (pyroute2 does not decode a bfifo's options; tc does)
    assert (fifo["kind"], fifo["options"]["limit"]) == ("bfifo", 4 * 1024 * 1024), fifo
    lab.remove_pod(pod)
