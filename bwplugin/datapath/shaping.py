"""Turns a configured rate and burst into TBF parameters. Pure.

The reference plugin sizes the queue as rate*25ms + burst, so a runtime-default
burst (containerd: 2^32-1 bits = 512 MiB) becomes both a 512 MiB token bucket
(huge first-second overshoot) and a 512 MiB queue (minutes of delay). We bound
the queue by a latency and cap the bucket by a time at the configured rate."""

from __future__ import annotations

from dataclasses import dataclass

from ..cni.config import Direction, Policy

ETH_HLEN = 14
GSO_MAX = 65536  # TBF segments GSO packets bigger than its bucket: cost, not loss
NS_PER_TICK = 64  # PSCHED_SHIFT = 6 in the kernel: 1 psched tick = 64 ns
U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class TBFParams:
    rate: int  # bytes/s, 64-bit (kernel takes TCA_TBF_RATE64 above 2^32-1)
    burst: int  # bucket size in bytes (TCA_TBF_BURST)
    limit: int  # queue size in bytes
    requested_burst: int  # what the config asked for, in bytes
    burst_capped: bool  # lowered by maxBurstMs
    burst_raised: bool  # raised to the floor (a few frames, or 64 KiB at high rates)
    gso_max: int = 65536  # the largest GSO packet the devices may hand this qdisc

    @property
    def buffer_ticks(self) -> int:
        """tc_tbf_qopt.buffer as the kernel dumps it (u32, wraps for huge buckets).
        TBF itself holds the bucket in 64-bit ns, set from TCA_TBF_BURST: only the dump wraps."""
        return (self.burst * 10**9 // self.rate // NS_PER_TICK) & U32_MAX

    @property
    def htb_buffer_ticks(self) -> int:
        """A legacy HTB class's bucket (subnet mode before 2026-12-03, when the shaped
        class itself held the rate), which the kernel takes as u32 ticks and nothing wider:
        clamped (at ~275 s of the rate), never wrapped (10 Mbit/s with containerd's
        512 MiB burst would wrap 429.5 s to 154.6 s)."""
        return min(self.burst * 10**9 // self.rate // NS_PER_TICK, U32_MAX)


def burst_floor(rate: int, mtu: int) -> int:
    """Smallest useful bucket: 4 frames, growing to 64 KiB (one GSO packet) once the
    rate passes ~52 Mbit/s (10 ms at rate), so TBF need not segment at high rates."""
    frame = mtu + ETH_HLEN
    return max(4 * frame, min(GSO_MAX, rate // 100))


def queue_floor(mtu: int, burst: int = 0, gso_max: int = GSO_MAX) -> int:
    """Smallest useful queue: 16 frames, so TCP at low rates is not starved, and two
    of the largest packets TBF lets through whole. TBF segments only GSO packets
    bigger than its bucket; one that is not segmented but does not fit the queue is
    dropped whole (44 segments at once), which stalls TCP into a retransmit timeout."""
    largest = min(burst, gso_max + mtu + ETH_HLEN)
    return max(16 * (mtu + ETH_HLEN), 2 * largest)


def tbf_params(direction: Direction, policy: Policy, mtu: int = 1500, gso_max: int = GSO_MAX) -> TBFParams:
    """gso_max: the largest GSO packet the pod's veth may carry (64 KiB, or more with
    BIG TCP), so that the queues can hold two of them."""
    rate = max(1, direction.rate // 8)
    requested = direction.burst // 8
    floor = burst_floor(rate, mtu)
    burst = requested
    capped = raised = False
    if policy.max_burst_ms > 0:
        cap = max(floor, int(rate * policy.max_burst_ms / 1000))
        if burst > cap:
            burst, capped = cap, True
    if burst < floor:
        burst, raised = floor, True
    limit = max(int(rate * policy.latency_ms / 1000), queue_floor(mtu, burst, gso_max))
    return TBFParams(
        rate=rate,
        burst=min(burst, U32_MAX),
        limit=min(limit, U32_MAX),
        requested_burst=requested,
        burst_capped=capped,
        burst_raised=raised,
        gso_max=gso_max,
    )


def htb_leaf_limit(params: TBFParams, mtu: int = 1500) -> int:
    """A legacy shaped HTB class's bfifo (subnet mode before 2026-12-03; today the
    leaf is a TBF, which segments). HTB, unlike TBF, never segments a GSO packet,
    and a bfifo drops any packet that would overflow it, even into an empty queue:
    so it must hold two of the largest, whatever the latency bound says. (At
    10 Mbit/s that is ~107 ms of queue instead of 25 ms: the price of subnets.)"""
    largest = params.gso_max + mtu + ETH_HLEN
    return min(max(params.limit, queue_floor(mtu, largest, params.gso_max)), U32_MAX)
