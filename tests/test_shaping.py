"""TBF sizing policy: pure."""

from bwplugin.cni.config import Direction, Policy
from bwplugin.datapath.shaping import GSO_MAX, burst_floor, queue_floor, tbf_params

CONTAINERD_BURST = 4294967295
CRIO_BURST = 34359738359


def test_runtime_default_burst_is_capped_to_max_burst_ms():
    p = tbf_params(Direction(10_000_000, CONTAINERD_BURST), Policy())
    assert p.rate == 1_250_000
    assert p.requested_burst == 536_870_911
    assert p.burst == 12_500  # 10 ms at 10 Mbit/s
    assert p.burst_capped and not p.burst_raised


def test_crio_burst_is_capped_too():
    p = tbf_params(Direction(100_000_000, CRIO_BURST), Policy())
    assert p.burst == 125_000 and p.burst_capped


def test_cap_disabled_keeps_the_configured_burst():
    p = tbf_params(Direction(10_000_000, CONTAINERD_BURST), Policy(max_burst_ms=0))
    assert p.burst == 536_870_911 and not p.burst_capped


def test_queue_is_bounded_by_latency_not_burst():
    p = tbf_params(Direction(100_000_000, CONTAINERD_BURST), Policy(latency_ms=25))
    assert p.limit == 312_500  # 25 ms at 12.5 MB/s, whatever the burst
    assert abs(p.limit * 1000 / p.rate - 25) < 1e-9  # ms of queue at the rate


def test_small_burst_is_raised_to_a_few_frames_and_gso_at_high_rates():
    low = tbf_params(Direction(1_000_000, 8), Policy())
    assert low.burst == burst_floor(125_000, 1500) == 4 * 1514 and low.burst_raised
    high = tbf_params(Direction(10_000_000_000, 8 * 1000), Policy())
    assert high.burst == GSO_MAX


def test_queue_floor_at_low_rates():
    p = tbf_params(Direction(1_000_000, 100_000), Policy(latency_ms=1))
    assert p.limit == queue_floor(1500) == 16 * 1514


def test_queue_holds_two_unsegmented_gso_packets():
    # a 100 ms bucket at 10 Mbit/s (125 KB) passes 64 KB GSO packets whole: the
    # 25 ms queue (31 KB) could never hold one, so the floor lifts it
    p = tbf_params(Direction(10_000_000, CONTAINERD_BURST), Policy(max_burst_ms=100))
    assert p.limit == 2 * (65536 + 1514)
    # with the default 10 ms bucket TBF segments instead, and 25 ms stands
    assert tbf_params(Direction(10_000_000, CONTAINERD_BURST), Policy()).limit == 31_250


def test_64_bit_rates_are_exact():
    p = tbf_params(Direction(100 * 10**9, 10**9), Policy())
    assert p.rate == 12_500_000_000  # > 2^32 bytes/s: needs TCA_TBF_RATE64


def test_buffer_ticks_match_kernel_units():
    # 125000 B at 1.25 MB/s = 100 ms = 1_562_500 ticks of 64 ns
    p = tbf_params(Direction(10_000_000, CONTAINERD_BURST), Policy(max_burst_ms=100))
    assert p.buffer_ticks == 1_562_500


def test_jumbo_mtu_floors_scale():
    p = tbf_params(Direction(1_000_000, 8), Policy(), mtu=9000)
    assert p.burst == 4 * 9014


def test_legacy_htb_leaf_holds_two_gso_packets_but_follows_latency_above():
    """Subnet mode before 2026-12-03 (kept for CHECK and live changes of its pods)."""
    from bwplugin.datapath.shaping import htb_leaf_limit

    low = tbf_params(Direction(10_000_000, 4294967295), Policy())
    assert low.limit == 31_250 and htb_leaf_limit(low) == 2 * (65536 + 1514)
    high = tbf_params(Direction(1_000_000_000, 4294967295), Policy())
    assert htb_leaf_limit(high) == high.limit == 3_125_000


def test_legacy_htb_bucket_is_clamped_not_wrapped_at_32_bits():
    """10 Mbit/s, containerd's burst, no maxBurstMs cap: 429.5 s of bucket, which
    a legacy subnet-mode HTB class's u32 ticks cannot hold. Clamped to the largest
    (~274.9 s), never wrapped (which gave 154.6 s)."""
    p = tbf_params(Direction(10_000_000, CONTAINERD_BURST), Policy(max_burst_ms=0))
    assert p.htb_buffer_ticks == 2**32 - 1
    assert (p.burst * 10**9 // p.rate // 64) & (2**32 - 1) == p.buffer_ticks  # what TBF's dump shows
    assert abs(p.htb_buffer_ticks * 64 / 1e9 - 274.88) < 0.01
    # monotonic: a bigger bucket never gives a smaller HTB bucket
    ticks = [
        tbf_params(Direction(10_000_000, b), Policy(max_burst_ms=0)).htb_buffer_ticks
        for b in range(8, CONTAINERD_BURST, 2**27)
    ]
    assert ticks == sorted(ticks)
    small = tbf_params(Direction(10_000_000, 80_000), Policy())
    assert small.htb_buffer_ticks == small.buffer_ticks
