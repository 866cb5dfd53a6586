"""The six measurements. Each returns plain rows (dicts) for the report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import time
from typing import Any

from bench.lab import bpfstats
from bench.lab.lab import CONTAINERD_BURST, remove_pin_dir, runtime_bandwidth
from bench.lab.measure import TCP_GOODPUT_CEILING, UDP_GOODPUT_CEILING, Sampler, iperf_goodput

from .harness import LOAD_PORT, MEASURE_PORT, PLUGINS, SUBNETS, Bench, order, progress, rotated

USER_HZ = 100
CPUS = os.cpu_count() or 1


def busy_seconds() -> float:
    """Machine-wide CPU time spent not idle, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / USER_HZ


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---------------------------------------------------------------- 1. accuracy


def accuracy(bench: Bench, rates: list[int], protos: list[str], repeats: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    points = [(r, d, p, i) for r in rates for d in ("ingress", "egress") for p in protos for i in range(repeats)]
    for n, (rate, direction, proto, rep) in enumerate(points):
        for plugin in order(n):
            ours = plugin == "bwplugin"  # the reference runs no eBPF: no stats switched on for it
            stats = bpfstats.run_time_stats() if ours else contextlib.nullcontext()
            with bench.shaped(plugin, **{direction: rate}) as shaped, stats:
                dev = shaped.device(direction)
                cpu0 = busy_seconds()
                progs0 = bpfstats.snapshot() if ours else {}
                with Sampler(bench.lab.node, [dev], interval=0.1) as s:
                    result = bench.iperf(
                        shaped.pod,
                        seconds=seconds,
                        reverse=direction == "ingress",
                        udp_rate=int(rate * 1.2) if proto == "udp" else 0,
                    )
                cpu = busy_seconds() - cpu0
                bpf_ns, bpf_runs = bpfstats.spent(progs0, bpfstats.snapshot()) if ours else (0, 0)
            first, last = s.active(dev)
            wire = s.steady_rate(dev)
            per_second = s.per_second(dev, first + 1.0, last - 0.3) or [wire]
            wire_bytes, _ = s.bytes_between(dev, 0, last + 1)
            ceiling = TCP_GOODPUT_CEILING if proto == "tcp" else UDP_GOODPUT_CEILING
            row = {
                "plugin": plugin,
                "rate": rate,
                "direction": direction,
                "proto": proto,
                "repeat": rep,
                "wire_bps": wire,
                "wire_ratio": wire / rate,
                "goodput_ratio": iperf_goodput(result) / (rate * ceiling),
                "swing": (max(per_second) - min(per_second)) / rate,
                # machine-wide CPU (iperf3 included): meaningful only where shaping costs show
                "cpu_s_per_gbit": cpu / (wire_bytes * 8 / 1e9) if wire_bytes and rate >= 100e6 else float("nan"),
                # the eBPF programs' own time (kernel run-time stats; the reference runs none)
                "bpf_ns_per_run": bpf_ns / bpf_runs if bpf_runs else float("nan"),
                "bpf_cpu_share": bpf_ns / 1e9 / cpu if bpf_runs and cpu > 0 else float("nan"),
            }
            rows.append(row)
            progress(
                f"accuracy {plugin:9} {direction:7} {proto} {rate / 1e6:6g} Mbit/s: "
                f"wire {row['wire_ratio']:.3f}, goodput/ceiling {row['goodput_ratio']:.3f}"
            )
    return rows


# ---------------------------------------------------------------- 2. bursts


def bursts(bench: Bench, rate: int, burst_sets: dict[str, int]) -> list[dict[str, Any]]:
    """Bytes through the ingress TBF in the first 0.1/1/2 s of a TCP flow."""
    rows = []
    for n, (label, burst) in enumerate(burst_sets.items()):
        for plugin in order(n):
            with (
                bench.shaped(plugin, ingress=rate, burst=burst) as shaped,
                Sampler(bench.lab.node, [shaped.veth], interval=0.01) as s,
            ):
                bench.iperf(shaped.pod, seconds=2.5, omit=0, reverse=True)
            pts = s.samples[shaped.veth]
            start = next(i for i in range(1, len(pts)) if pts[i][1] > pts[i - 1][1]) - 1
            t0, b0 = pts[start]
            row: dict[str, Any] = {"plugin": plugin, "burst_label": label, "burst_bits": burst, "rate": rate}
            for t in (0.1, 1.0, 2.0):
                passed = max(b for ts, b in pts if ts <= t0 + t) - b0
                bound = rate / 8 * t + burst / 8
                row[f"bytes_{t:g}s"] = passed
                row[f"overshoot_{t:g}s"] = passed / (rate / 8 * t)
                row[f"within_bound_{t:g}s"] = passed <= bound
            row["curve"] = [(ts - t0, b - b0) for ts, b in pts[start:] if ts - t0 <= 2.0]
            rows.append(row)
            progress(
                f"burst {plugin:9} {label:10}: first 100 ms {row['overshoot_0.1s']:.1f}x rate, "
                f"first 1 s {row['overshoot_1s']:.2f}x"
            )
    return rows


# ---------------------------------------------------------------- 3. latency under load

_RTT = re.compile(r"time=([\d.]+) ms")


def ping(bench: Bench, pod: Any, count: int, interval: float) -> tuple[list[float], float]:
    out = subprocess.run(
        ["nsenter", f"--net={pod.netns}", "ping", "-n", "-i", str(interval), "-c", str(count), "-W", "15",
         bench.peer.ip],
        capture_output=True, text=True, timeout=count * interval + 60,
    ).stdout  # fmt: skip
    rtts = [float(m) for m in _RTT.findall(out)]
    return rtts, 1 - len(rtts) / count


def ping_under_load(bench: Bench, pod: Any, direction: str, count: int) -> tuple[list[float], float]:
    """Pings from the pod while one bulk TCP flow saturates the shaped direction."""
    argv = ["iperf3", "-c", bench.peer.ip, "-p", str(LOAD_PORT), "-t", "60"]
    if direction == "ingress":
        argv.append("-R")
    load = bench.lab.spawn(pod.netns, *argv)
    try:
        time.sleep(2.0)  # let the bulk flow fill the queue
        return ping(bench, pod, count, 0.05)
    finally:
        load.terminate()
        load.wait()
        time.sleep(0.5)  # the server notices the end of the test


def latency(bench: Bench, rates: list[int], count: int) -> list[dict[str, Any]]:
    rows = []
    points = [(r, d) for r in rates for d in ("egress", "ingress")]
    for n, (rate, direction) in enumerate(points):
        for plugin in order(n):
            with bench.shaped(plugin, **{direction: rate}) as shaped:
                idle, _ = ping(bench, shaped.pod, 40, 0.02)
                loaded, loss = ping_under_load(bench, shaped.pod, direction, count)
            row = {
                "plugin": plugin,
                "rate": rate,
                "direction": direction,
                "idle_p50_ms": percentile(idle, 50),
                "loaded_p50_ms": percentile(loaded, 50),
                "loaded_p99_ms": percentile(loaded, 99),
                "ping_loss": loss,
            }
            rows.append(row)
            progress(
                f"latency {plugin:9} {direction:7} {rate / 1e6:g} Mbit/s: idle {row['idle_p50_ms']:.2f} ms, "
                f"loaded p50 {row['loaded_p50_ms']:.1f} ms p99 {row['loaded_p99_ms']:.1f} ms, loss {loss:.0%}"
            )
    return rows


# ---------------------------------------------------------------- 4. fairness


def fairness(bench: Bench, rate: int, flow_counts: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for n, flows in enumerate(flow_counts):
        for plugin in order(n):
            with bench.shaped(plugin, egress=rate) as shaped:
                result = bench.iperf(shaped.pod, seconds=seconds, extra=("-P", str(flows)))
            xs = [s["receiver"]["bits_per_second"] for s in result["end"]["streams"]]
            jain = sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))
            rows.append({"plugin": plugin, "rate": rate, "flows": flows, "jain": jain, "total_bps": sum(xs)})
            progress(f"fairness {plugin:9} {flows:2} flows at {rate / 1e6:g} Mbit/s: Jain {jain:.3f}")
    return rows


# ---------------------------------------------------------------- 5. subnets


def subnets(bench: Bench, rate: int, seconds: float) -> list[dict[str, Any]]:
    """A pod shaped at `rate` both ways talks to two peers: one in an unshaped subnet
    (think node or cluster network) and one outside it. bwplugin is configured with
    unshapedSubnets; Debian's reference plugin (1.1.1) has no such option, so it
    shapes both: that is what a user gets from it today."""
    lab = bench.lab
    fast = lab.pod("fastpeer")
    lab.attach(fast, lab.conflist(None, name="bwpt-peer", subnet=SUBNETS["peer"]))
    lab.iperf_server(fast, MEASURE_PORT)
    rows = []
    try:
        for n, plugin in enumerate(order(0) + order(1)):
            static = {"unshapedSubnets": [f"{fast.ip}/32"]} if plugin == "bwplugin" else None
            with bench.shaped_with(plugin, static, ingress=rate, egress=rate) as shaped:
                for direction in ("egress", "ingress"):
                    for dest, server in (("unshaped peer", fast), ("shaped peer", bench.peer)):
                        result = lab.iperf(
                            shaped.pod, server, port=MEASURE_PORT, seconds=seconds, reverse=direction == "ingress"
                        )
                        goodput = iperf_goodput(result)
                        row = {"plugin": plugin, "rate": rate, "direction": direction, "destination": dest}
                        rows.append({**row, "repeat": n // 2, "goodput_bps": goodput, "goodput_ratio": goodput / rate})
                        progress(f"subnets {plugin:9} {direction:7} to {dest}: {goodput / 1e6:.1f} Mbit/s")
    finally:
        lab.remove_pod(fast)
    return rows


# ---------------------------------------------------------------- 5b. subnet mode against plain mode


def subnet_mode(bench: Bench, rates: list[int], count: int, repeats: int, seconds: float) -> list[dict[str, Any]]:
    """bwplugin alone, the same rate and latencyMs, with and without a subnet list
    (an HTB that sorts over the shaped TBF, or the TBF as root), interleaved: ping
    to the shaped peer behind one bulk TCP flow to it, then TCP goodput to it. The
    listed subnet is one nobody here uses: every packet measured takes the shaped
    class, so the two differ only in the qdiscs."""
    rows = []
    points = [(r, d, i) for r in rates for d in ("egress", "ingress") for i in range(repeats)]
    for n, (rate, direction, rep) in enumerate(points):
        modes = ["plain", "subnets"] if n % 2 == 0 else ["subnets", "plain"]
        for mode in modes:
            static = {"unshapedSubnets": ["10.99.0.0/16"]} if mode == "subnets" else None
            with bench.shaped_with("bwplugin", static, **{direction: rate}) as shaped:
                loaded, loss = ping_under_load(bench, shaped.pod, direction, count)
                result = bench.iperf(shaped.pod, seconds=seconds, reverse=direction == "ingress")
            row = {
                "mode": mode,
                "rate": rate,
                "direction": direction,
                "repeat": rep,
                "loaded_p50_ms": percentile(loaded, 50),
                "loaded_p99_ms": percentile(loaded, 99),
                "ping_loss": loss,
                "goodput_ratio": iperf_goodput(result) / rate,
            }
            rows.append(row)
            progress(
                f"subnet mode {mode:7} {direction:7} {rate / 1e6:g} Mbit/s: ping p50 {row['loaded_p50_ms']:.1f} ms "
                f"p99 {row['loaded_p99_ms']:.1f} ms, TCP goodput {row['goodput_ratio']:.3f} of the rate"
            )
    return rows


# ---------------------------------------------------------------- 6. cost


# bwplugin is measured three ways: through the node agent from the Python executable
# (systemd installs), through the agent from the static forwarder (the DaemonSet's
# executable), and with no agent running (the executable does the work itself)
VARIANTS = {
    "bwplugin (agent)": ("bwplugin", {}, False),
    "bwplugin (forwarder)": ("bwplugin", {}, True),
    "bwplugin (no agent)": ("bwplugin", {"BWPLUGIN_NO_AGENT": "1"}, False),
    "reference": ("reference", {}, False),
}
THROUGH_AGENT = ("bwplugin (agent)", "bwplugin (forwarder)")


def _with_env(bench: Bench, extra: dict[str, str], forwarder: bool = False) -> tuple[dict[str, str], list[str]]:
    saved = dict(bench.lab.runtime.extra_env), list(bench.lab.runtime.cni_path)
    bench.lab.runtime.extra_env.update(extra)
    if forwarder:
        bench.lab.runtime.cni_path[:0] = [str(bench.lab.forwarder_bin_dir())]
    return saved


def _restore_env(bench: Bench, saved: tuple[dict[str, str], list[str]]) -> None:
    env = bench.lab.runtime.extra_env  # in place: callers hold this very dict
    env.clear()
    env.update(saved[0])
    bench.lab.runtime.cni_path[:] = saved[1]


def _timed_add(bench: Bench, variant: str) -> tuple[Any, float, float]:
    plugin, extra, forwarder = VARIANTS[variant]
    saved = _with_env(bench, extra, forwarder)
    try:
        burst = CONTAINERD_BURST
        bw = {"ingressRate": 10**7, "ingressBurst": burst, "egressRate": 10**7, "egressBurst": burst}
        shaped = bench.add(plugin, {"bandwidth": bw})
    finally:
        _restore_env(bench, saved)
    att = shaped.pod.attachment
    assert att is not None
    kind = PLUGINS[plugin]["type"]
    return shaped, att.timings[f"{kind}:ADD"], att.timings[f"{kind}:ADD:cpu"]


def _timed_del(bench: Bench, variant: str, shaped: Any) -> float:
    plugin, extra, forwarder = VARIANTS[variant]
    att = shaped.pod.attachment
    saved = _with_env(bench, extra, forwarder)
    try:
        bench.lab.remove_pod(shaped.pod)
    finally:
        _restore_env(bench, saved)
    return float(att.timings[f"{PLUGINS[plugin]['type']}:DEL"])


def _agent_cpu_seconds(bench: Bench) -> float:
    """utime + stime of the agent process (only agent-variant requests reach it)."""
    agent = bench.lab.agent
    if agent is None:
        return 0.0
    with open(f"/proc/{agent.pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / USER_HZ


def _order(i: int) -> tuple[str, ...]:
    return rotated(tuple(VARIANTS), i)


def cost(bench: Bench, pods: int, background: int) -> list[dict[str, Any]]:
    """ADD/DEL wall and CPU time of the shaping plugin alone (not ptp), both directions
    shaped. CPU is the plugin process's own; the agent's share is not in it."""
    rows = []
    env = bench.lab.runtime.extra_env
    node_pins = env["BWPLUGIN_PIN_DIR"]
    env["BWPLUGIN_PIN_DIR"] = cold_pins = f"{node_pins}-cold"  # empty: bwplugin must compile and pin
    try:
        for variant in ("bwplugin (no agent)", "reference"):
            shaped, add_s, _ = _timed_add(bench, variant)
            _timed_del(bench, variant, shaped)
            rows.append({"plugin": variant, "phase": "first ADD on a node", "add_ms": [add_s * 1000]})
            progress(f"cost {variant:19} first ADD on a node: {add_s * 1000:.0f} ms")
    finally:
        env["BWPLUGIN_PIN_DIR"] = node_pins
        remove_pin_dir(cold_pins)

    def phase(label: str) -> None:
        samples: dict[str, dict[str, list[float]]] = {v: {"add": [], "cpu": [], "del": []} for v in VARIANTS}
        live: list[tuple[str, Any]] = []
        agent_cpu = _agent_cpu_seconds(bench)
        for i in range(pods):
            for variant in _order(i):
                shaped, add_s, cpu_s = _timed_add(bench, variant)
                samples[variant]["add"].append(add_s * 1000)
                samples[variant]["cpu"].append(cpu_s * 1000)
                live.append((variant, shaped))
        # both agent variants' requests reach the one agent, which does the same work for each
        agent_cpu_per_add_ms = (_agent_cpu_seconds(bench) - agent_cpu) * 1000 / (pods * len(THROUGH_AGENT))
        for variant, shaped in live:
            samples[variant]["del"].append(_timed_del(bench, variant, shaped) * 1000)
        for variant, s in samples.items():
            row: dict[str, Any] = {
                "plugin": variant,
                "phase": label,
                "add_ms": s["add"],
                "cpu_ms": s["cpu"],
                "del_ms": s["del"],
            }
            if variant in THROUGH_AGENT:
                row["agent_cpu_per_add_ms"] = agent_cpu_per_add_ms  # mean; /proc/stat ticks are 10 ms
            rows.append(row)
            progress(
                f"cost {variant:19} {label}: ADD p50 {statistics.median(s['add']):.1f} ms, "
                f"DEL p50 {statistics.median(s['del']):.1f} ms"
            )

    phase("0 pods shaped")
    if background:
        progress(f"cost: shaping {background} background pods with each plugin")
        held = [(p, _timed_add(bench, p)[0]) for i in range(background) for p in ("bwplugin (agent)", "reference")]
        phase(f"{background} pods shaped")
        for variant, shaped in held:
            _timed_del(bench, variant, shaped)
    return rows


# ---------------------------------------------------------------- 7. attach paths (bwplugin alone)

ATTACH_PATHS = ("tcx", "tc")


def attach_paths(bench: Bench, rates: list[int], seconds: float, pods: int) -> list[dict[str, Any]]:
    """bwplugin's two ways of attaching its counting programs (tcAttach), interleaved
    in one run: TCX links against cls_bpf filters. Wire/conf in both directions, and
    ADD/DEL wall time through the agent."""
    rows: list[dict[str, Any]] = []
    points = [(r, d, p) for r in rates for d in ("ingress", "egress") for p in ("tcp", "udp")]
    for n, (rate, direction, proto) in enumerate(points):
        for path in ATTACH_PATHS if n % 2 == 0 else ATTACH_PATHS[::-1]:
            with bench.shaped_with("bwplugin", {"tcAttach": path}, **{direction: rate}) as shaped:
                dev = shaped.device(direction)
                with Sampler(bench.lab.node, [dev], interval=0.1) as s:
                    bench.iperf(
                        shaped.pod,
                        seconds=seconds,
                        reverse=direction == "ingress",
                        udp_rate=int(rate * 1.2) if proto == "udp" else 0,
                    )
            wire = s.steady_rate(dev)
            rows.append({"measure": "accuracy", "path": path, "rate": rate, "direction": direction,
                         "proto": proto, "wire_ratio": wire / rate})  # fmt: skip
            progress(f"attach {path:3} {direction:7} {proto} {rate / 1e6:6g} Mbit/s: wire {wire / rate:.4f}")
    times: dict[str, dict[str, list[float]]] = {p: {"add": [], "del": [], "settled": []} for p in ATTACH_PATHS}
    for i in range(pods):
        for path in ATTACH_PATHS if i % 2 == 0 else ATTACH_PATHS[::-1]:
            shaped = bench.add("bwplugin", runtime_bandwidth(ingress=10**7, egress=10**7), {"tcAttach": path})
            answered = time.monotonic()
            att = shaped.pod.attachment
            assert att is not None
            if path == "tcx" and bench.lab.agent is not None:
                times[path]["settled"].append(_handover_ms(bench, shaped.veth, answered))
            time.sleep(0.1)  # a pod lives longer than its ADD: DEL is timed on a settled attachment
            bench.lab.remove_pod(shaped.pod)
            times[path]["add"].append(att.timings["bwplugin:ADD"] * 1000)
            times[path]["del"].append(att.timings["bwplugin:DEL"] * 1000)
    for path, t in times.items():
        row = {"measure": "cost", "path": path, "add_ms": t["add"], "del_ms": t["del"]}
        if t["settled"]:
            row["handover_ms"] = t["settled"]
        rows.append(row)
        add, dels = statistics.median(t["add"]), statistics.median(t["del"])
        moved = f", counting on TCX {statistics.median(t['settled']):.1f} ms after the answer" if t["settled"] else ""
        progress(f"attach {path:3}: ADD p50 {add:.1f} ms, DEL p50 {dels:.1f} ms{moved}")
    return rows


def _handover_ms(bench: Bench, veth: str, answered: float, timeout: float = 5.0) -> float:
    """Through the agent, ADD answers counting with cls_bpf filters and the agent
    then moves the counting to TCX links: ms from the answer until the cls_bpf
    counters (prio 0xb0d) are gone from both hooks, the move's last step."""
    while True:
        prios = set()
        for hook in ("ingress", "egress"):
            out = bench.lab.run(bench.lab.node, "tc", "-j", "filter", "show", "dev", veth, hook).stdout
            prios |= {f.get("pref") for f in json.loads(out or "[]")}
        if 0xB0D not in prios:
            return (time.monotonic() - answered) * 1000
        if time.monotonic() - answered > timeout:
            raise RuntimeError(f"the agent did not move {veth}'s counting to TCX within {timeout:g} s")
        time.sleep(0.002)


# ---------------------------------------------------------------- 8. datapath cost

DATAPATH_SHAPERS = ("none", "bwplugin", "reference")
# the shaped rate over the offered load on the wire: no variant drops or queues, so
# all carry the same packets and the section compares the work per packet, not what
# gets through
HEADROOM = 1.25
UDP_WIRE_EXTRA = 8 + 20 + 14  # UDP, IPv4 and Ethernet headers over iperf3's payload
SETTLE_S = 1.0  # after ADD: the agent moves bwplugin's counting to TCX links then
# iperf3's client on one CPU and its server on the other: where the scheduler puts
# them changes the cost per byte by up to a half on this 2-CPU VM, which drowns shapers
AFFINITY = ("-A", "0,1")


def cpu_times() -> tuple[float, float, float]:
    """(wall clock, idle, kernel) seconds, machine-wide, from /proc/stat. Idle is
    exact on this tickless kernel (measured at each idle entry and exit), so wall x
    CPUs - idle is the busy time to the microsecond. Kernel (system + irq +
    softirq: where tc programs and qdiscs run, in the sender's system call or in
    softirq) is sampled at each 4 ms tick, which a paced sender's work can dodge:
    reported, but the overheads come from the busy time, in which iperf3's own user
    time is the same for every variant at one load."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return time.monotonic(), (f[3] + f[4]) / USER_HZ, (f[2] + f[5] + f[6]) / USER_HZ


def _delivered(result: dict[str, Any], proto: str, length: int) -> tuple[float, float]:
    """(packets, bytes) the receiver got: UDP datagrams of `length`; for TCP, bytes
    only (a packet count means little under GSO, so TCP is reported per Gbit)."""
    got = result["end"]["sum_received"]["bytes"]
    return (got / length if proto == "udp" else float("nan")), got


def datapath(
    bench: Bench, udp_share: float, udp_length: int, tcp_rates: list[int], repeats: int, seconds: float
) -> list[dict[str, Any]]:
    """The kernel CPU one packet costs with each shaper, at one offered load for all
    and against no shaper at all (issue 17, item 3), interleaved. Loads: UDP
    datagrams of `udp_length` bytes at `udp_share` of the highest packet rate the
    unshaped path sustains here (measured first), and TCP paced by iperf3 at each
    of `tcp_rates`; each direction shaped at HEADROOM x the load. bwplugin's eBPF
    programs report their own run time in one more run per point (the kernel's bpf
    stats cost two clock reads per program run, which the timed runs must not pay)."""
    with bench.shaped("none") as s:
        top = bench.iperf(s.pod, seconds=seconds, extra=("-u", "-b", "0", "-l", str(udp_length)))
    top_pps = _delivered(top, "udp", udp_length)[0] / seconds
    pps = top_pps * udp_share
    udp_bps = int(pps * udp_length * 8)
    progress(f"datapath: unshaped UDP peaks at {top_pps / 1e3:.0f} kpps; offering {pps / 1e3:.0f} kpps")
    # (proto, iperf3's -b, the shaped rate)
    loads = [("udp", udp_bps, int(pps * (udp_length + UDP_WIRE_EXTRA) * 8 * HEADROOM))]
    loads += [("tcp", r, int(r * HEADROOM)) for r in tcp_rates]
    points = [(p, b, r, d, i) for p, b, r in loads for d in ("egress", "ingress") for i in range(repeats)]
    rows = []
    for n, (proto, load, rate, direction, rep) in enumerate(points):
        shapers = rotated(DATAPATH_SHAPERS, n)
        # bwplugin once more with the bpf stats on: their clock reads would add to its CPU
        timed = [(s, False) for s in shapers] + ([("bwplugin", True)] if rep == 0 else [])
        for shaper, stats in timed:
            row = _datapath_run(bench, shaper, proto, (load, rate), direction, udp_length, seconds, stats)
            rows.append({**row, "repeat": rep})
            progress(
                f"datapath {shaper:9} {proto} {direction:7} {load / 1e6:7.1f} Mbit/s: delivered "
                f"{row['delivered_ratio']:.3f}, CPU {row['ms_per_gbit']:.1f} ms/Gbit"
                + (f", {row['us_per_packet']:.2f} us/packet" if proto == "udp" else "")
                + (f", eBPF {row['bpf_ns_per_packet']:.0f} ns/packet" if stats else "")
            )
    return rows


def _datapath_run(
    bench: Bench,
    shaper: str,
    proto: str,
    load_rate: tuple[int, int],
    direction: str,
    length: int,
    seconds: float,
    stats: bool,
) -> dict[str, Any]:
    load, rate = load_rate
    with bench.shaped(shaper, **({} if shaper == "none" else {direction: rate})) as shaped:
        extra = (*AFFINITY, "-u", "-l", str(length)) if proto == "udp" else AFFINITY
        time.sleep(SETTLE_S)
        with bpfstats.run_time_stats() if stats else contextlib.nullcontext():
            progs0, (wall0, idle0, kernel0) = bpfstats.snapshot(), cpu_times()
            result = bench.iperf(
                shaped.pod, seconds=seconds, reverse=direction == "ingress", extra=(*extra, "-b", str(load))
            )
            wall1, idle1, kernel1 = cpu_times()
            bpf_ns, bpf_runs = bpfstats.spent(progs0, bpfstats.snapshot())
    busy = (wall1 - wall0) * CPUS - (idle1 - idle0)
    kernel = kernel1 - kernel0
    packets, got = _delivered(result, proto, length)
    sent = result["end"]["sum_sent"]["bytes"]
    nan = float("nan")
    return {
        "shaper": shaper,
        "bpf_stats": stats,
        "proto": proto,
        "load_bps": load,  # iperf3's -b: UDP payload, TCP goodput
        "length": length if proto == "udp" else 0,
        "shaped_bps": rate if shaper != "none" else 0,
        "direction": direction,
        "delivered_ratio": got / sent if sent else nan,
        "delivered_bps": got * 8 / seconds,
        "busy_s": busy,
        "kernel_s": kernel,
        # per datagram for UDP; per Gbit delivered for TCP, whose packet count means
        # little under GSO
        "us_per_packet": busy * 1e6 / packets if proto == "udp" and packets else nan,
        "kernel_us_per_packet": kernel * 1e6 / packets if proto == "udp" and packets else nan,
        "ms_per_gbit": busy * 1e3 / (got * 8 / 1e9) if got else nan,
        "kernel_ms_per_gbit": kernel * 1e3 / (got * 8 / 1e9) if got else nan,
        "bpf_ns_per_run": bpf_ns / bpf_runs if stats and bpf_runs else nan,
        # per datagram for UDP, per Gbit's worth of 1500-byte packets for TCP
        "bpf_ns_per_packet": bpf_ns / (packets if proto == "udp" else got / 1500) if stats and got else nan,
    }


# ---------------------------------------------------------------- 9. the bucket at the top

# bwplugin's bucket cap (maxBurstMs) against the reference, TCP at the top rates
BUCKETS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "bwplugin (maxBurstMs 10, default)": ("bwplugin", None),
    "bwplugin (maxBurstMs 100)": ("bwplugin", {"maxBurstMs": 100}),
    "reference": ("reference", None),
}


def top_bucket(bench: Bench, rates: list[int], repeats: int, seconds: float) -> list[dict[str, Any]]:
    """Wire/conf of one unpaced TCP flow at the top rates, bwplugin with its default
    10 ms bucket cap and with 100 ms, interleaved with the reference (whose bucket is
    containerd's 512 MiB). A bucket holds what the flow may catch up after a gap in
    its sending (a sender not scheduled, a loss recovery): at 10 Gbit/s on a 2-CPU VM
    such gaps are longer than 10 ms, and the rate they cost is lost for good."""
    rows = []
    names = tuple(BUCKETS)
    points = [(r, d, i) for r in rates for d in ("egress", "ingress") for i in range(repeats)]
    for n, (rate, direction, rep) in enumerate(points):
        for label in rotated(names, n):
            plugin, static = BUCKETS[label]
            with bench.shaped_with(plugin, static, **{direction: rate}) as shaped:
                time.sleep(SETTLE_S)
                dev = shaped.device(direction)
                with Sampler(bench.lab.node, [dev], interval=0.1) as s:
                    result = bench.iperf(shaped.pod, seconds=seconds, reverse=direction == "ingress")
                wire = s.steady_rate(dev)
            row = {
                "variant": label,
                "rate": rate,
                "direction": direction,
                "repeat": rep,
                "wire_ratio": wire / rate,
                "retransmits": result["end"]["sum_sent"].get("retransmits", 0),
            }
            rows.append(row)
            progress(f"top bucket {label:34} {direction:7} {rate / 1e9:g} Gbit/s: wire {row['wire_ratio']:.3f}")
    return rows
