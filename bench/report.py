"""Markdown tables and a PNG plot from a benchmark result."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

PLUGINS = ("bwplugin", "reference")
COST_VARIANTS = ("bwplugin (agent)", "bwplugin (forwarder)", "bwplugin (no agent)", "reference")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> str:
    return f"{_med(xs):.3f}" + (f" ({min(xs):.3f}–{max(xs):.3f})" if len(xs) > 1 else "")


def _cpu(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    return f"{_med(xs):.2f}" if xs else "–"


def _num(xs: list[float], fmt: str) -> str:
    """The median of what was measured (rows of older results lack the key)."""
    xs = [x for x in xs if x == x]
    return format(_med(xs), fmt) if xs else "–"


def _mbit(bps: float) -> str:
    return f"{bps / 1e6:g}"


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[int, str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["rate"], r["direction"], r["proto"])][r["plugin"]].append(r)
    out = [
        "| rate Mbit/s | direction | proto | wire/conf bwplugin | wire/conf reference | goodput/ceiling bwplugin "
        "| goodput/ceiling reference | 1-s swing bwplugin | 1-s swing reference | CPU s/Gbit bwplugin "
        "| CPU s/Gbit reference | eBPF ns/run bwplugin | eBPF share of CPU bwplugin |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (rate, direction, proto), by in sorted(groups.items()):

        def col(key: str, plugin: str, by: dict[str, list[dict[str, Any]]] = by) -> list[float]:
            return [r.get(key, float("nan")) for r in by.get(plugin, [])]

        out.append(
            f"| {_mbit(rate)} | {direction} | {proto} | "
            + " | ".join(_spread(col("wire_ratio", p)) for p in PLUGINS)
            + " | "
            + " | ".join(_spread(col("goodput_ratio", p)) for p in PLUGINS)
            + " | "
            + " | ".join(f"{_med(col('swing', p)):.3f}" for p in PLUGINS)
            + " | "
            + " | ".join(_cpu(col("cpu_s_per_gbit", p)) for p in PLUGINS)
            + f" | {_num(col('bpf_ns_per_run', 'bwplugin'), '.0f')} | {_num(col('bpf_cpu_share', 'bwplugin'), '.1%')} |"
        )
    return "\n".join(out)


def burst_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| burst sent | plugin | first 100 ms × rate | first 1 s × rate | first 2 s × rate | within rate·t + burst |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = all(r[f"within_bound_{t}s"] for t in ("0.1", "1", "2"))
        out.append(
            f"| {r['burst_label']} ({r['burst_bits']} bit) at {_mbit(r['rate'])} Mbit/s | {r['plugin']} | "
            f"{r['overshoot_0.1s']:.2f} | {r['overshoot_1s']:.2f} | {r['overshoot_2s']:.2f} | {'yes' if ok else 'no'} |"
        )
    return "\n".join(out)


def latency_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| rate Mbit/s | loaded direction | plugin | idle RTT p50 ms | loaded RTT p50 ms | loaded RTT p99 ms "
        "| ping loss |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {_mbit(r['rate'])} | {r['direction']} | {r['plugin']} | {r['idle_p50_ms']:.3f} | "
            f"{r['loaded_p50_ms']:.1f} | {r['loaded_p99_ms']:.1f} | {r['ping_loss']:.0%} |"
        )
    return "\n".join(out)


def fairness_table(rows: list[dict[str, Any]]) -> str:
    out = ["| flows | rate Mbit/s | plugin | Jain index | total/conf |", "|---:|---:|---|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['flows']} | {_mbit(r['rate'])} | {r['plugin']} | {r['jain']:.3f} "
            f"| {r['total_bps'] / r['rate']:.3f} |"
        )
    return "\n".join(out)


def subnets_table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["direction"], r["destination"])][r["plugin"]].append(r["goodput_bps"])
    rate = rows[0]["rate"]
    out = [
        "| direction | destination | bwplugin Mbit/s | reference Mbit/s | bwplugin / rate | reference / rate |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (direction, dest), by in sorted(groups.items()):
        ours, ref = _med(by.get("bwplugin", [])), _med(by.get("reference", []))
        out.append(
            f"| {direction} | {dest} | {ours / 1e6:.1f} | {ref / 1e6:.1f} | {ours / rate:.2f} | {ref / rate:.2f} |"
        )
    return "\n".join(out)


def subnet_mode_table(rows: list[dict[str, Any]]) -> str:
    """Medians over repeats; the ratio is subnet mode / plain mode (issue 17: p99 <= 1.2)."""
    out = [
        "| direction | rate Mbit/s | ping p99 plain ms | ping p99 subnets ms | p99 subnets / plain "
        "| TCP goodput/rate plain | TCP goodput/rate subnets |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in sorted({r["rate"] for r in rows}):
        for direction in ("egress", "ingress"):
            mine = [r for r in rows if (r["rate"], r["direction"]) == (rate, direction)]
            if not mine:
                continue

            def med(mode: str, key: str, rs: list[dict[str, Any]] = mine) -> float:
                return _med([r[key] for r in rs if r["mode"] == mode])

            plain, split = med("plain", "loaded_p99_ms"), med("subnets", "loaded_p99_ms")
            out.append(
                f"| {direction} | {_mbit(rate)} | {plain:.1f} | {split:.1f} | {split / plain:.2f} "
                f"| {med('plain', 'goodput_ratio'):.3f} | {med('subnets', 'goodput_ratio'):.3f} |"
            )
    return "\n".join(out)


def _p(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def cost_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| phase | plugin | pods | ADD p50 ms | ADD p95 ms | ADD CPU p50 ms (executable) | agent CPU per ADD ms "
        "| DEL p50 ms | DEL p95 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dels = r.get("del_ms", [])
        out.append(
            f"| {r['phase']} | {r['plugin']} | {len(r['add_ms'])} | {_p(r['add_ms'], 50):.1f} "
            f"| {_p(r['add_ms'], 95):.1f} | "
            f"{_p(r.get('cpu_ms', []), 50):.1f} | "
            + (f"{r['agent_cpu_per_add_ms']:.1f}" if "agent_cpu_per_add_ms" in r else "–")
            + f" | {_p(dels, 50):.1f} | {_p(dels, 95):.1f} |"
        )
    return "\n".join(out)


def attach_table(rows: list[dict[str, Any]]) -> str:
    """TCX path against cls_bpf path: the ratio is tcx / tc (1.00: the same)."""
    out = ["| measure | rate Mbit/s | direction | proto | TCX links | cls_bpf filters | TCX / cls_bpf |",
           "|---|---:|---|---|---:|---:|---:|"]  # fmt: skip
    acc = [r for r in rows if r["measure"] == "accuracy"]
    keys = sorted({(r["rate"], r["direction"], r["proto"]) for r in acc})
    for rate, direction, proto in keys:
        got = {r["path"]: _med([x["wire_ratio"] for x in acc if (x["rate"], x["direction"], x["proto"], x["path"])
                                == (rate, direction, proto, r["path"])]) for r in acc}  # fmt: skip
        if "tcx" in got and "tc" in got:
            out.append(f"| wire/conf | {rate / 1e6:g} | {direction} | {proto} | {got['tcx']:.4f} | {got['tc']:.4f} "
                       f"| {got['tcx'] / got['tc']:.4f} |")  # fmt: skip
    cost = {r["path"]: r for r in rows if r["measure"] == "cost"}
    if "tcx" in cost and "tc" in cost:
        for label, key in (("ADD p50 ms (agent)", "add_ms"), ("DEL p50 ms (agent)", "del_ms")):
            a, b = _p(cost["tcx"][key], 50), _p(cost["tc"][key], 50)
            out.append(f"| {label} | 10 | both | – | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        if cost["tcx"].get("handover_ms"):
            moved = _p(cost["tcx"]["handover_ms"], 50)
            out.append(f"| counting on TCX, ms after ADD answered (p50) | 10 | both | – | {moved:.1f} | – | – |")
    return "\n".join(out)


def _datapath_overheads(rows: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """Each shaper's cost over no shaper, taken within each round (the three ran
    back to back there), so that drift between rounds cancels."""
    rounds: dict[int, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if not r.get("bpf_stats"):
            rounds[r["repeat"]][r["shaper"]] = r[key]
    out: dict[str, list[float]] = defaultdict(list)
    for got in rounds.values():
        for shaper in PLUGINS:
            if shaper in got and "none" in got:
                out[shaper].append(got[shaper] - got["none"])
    return out


def datapath_table(rows: list[dict[str, Any]]) -> str:
    """CPU per UDP datagram (us) or per Gbit of TCP (ms), machine-wide busy time;
    the overhead is the cost over no shaper, and the ratio bwplugin's / the reference's."""
    out = [
        "| load | direction | unit | no shaper | bwplugin | reference | overhead bwplugin | overhead reference "
        "| bwplugin / reference | bwplugin's eBPF ns/packet |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["proto"], r["load_bps"], r["direction"])].append(r)
    for (proto, load, direction), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "udp", kv[0][1:])):
        key, unit = ("us_per_packet", "µs/packet") if proto == "udp" else ("ms_per_gbit", "ms/Gbit")
        timed = [r for r in rs if not r.get("bpf_stats")]

        def med(shaper: str, xs: list[dict[str, Any]] = timed, k: str = key) -> float:
            return _med([r[k] for r in xs if r["shaper"] == shaper])

        over = _datapath_overheads(rs, key)
        ours, ref = _med(over["bwplugin"]), _med(over["reference"])
        # no ratio where the reference's overhead is not clearly above zero (its
        # median within half the range of its rounds): it would be noise over noise
        refs = over["reference"]
        noise = (max(refs) - min(refs)) / 2 if len(refs) > 1 else 0.0
        ratio = f"{ours / ref:.2f}" if ref > noise else f"– (noise ±{noise:.2f})"
        if proto == "udp":
            label = f"UDP {rs[0]['length']} B at {load / (rs[0]['length'] * 8) / 1e3:.0f} kpps"
        else:
            label = f"TCP at {load / 1e9:g} Gbit/s"
        out.append(
            f"| {label} | {direction} | {unit} | {med('none'):.2f} | {med('bwplugin'):.2f} | {med('reference'):.2f} "
            f"| {ours:.2f} | {ref:.2f} | {ratio} | {_num([r['bpf_ns_per_packet'] for r in rs], '.0f')} |"
        )
    return "\n".join(out)


def top_bucket_table(rows: list[dict[str, Any]]) -> str:
    out = ["| rate Mbit/s | direction | variant | wire/conf (min–max) | TCP retransmits p50 |",
           "|---:|---|---|---:|---:|"]  # fmt: skip
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["rate"], r["direction"], r["variant"])].append(r)
    for (rate, direction, variant), rs in groups.items():
        out.append(
            f"| {rate / 1e6:g} | {direction} | {variant} | {_spread([r['wire_ratio'] for r in rs])} "
            f"| {_med([r['retransmits'] for r in rs]):.0f} |"
        )
    return "\n".join(out)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    parts = [
        f"### bwplugin vs reference `bandwidth` — profile `{meta['profile']}`",
        f"Measured {meta['date']} on {meta['machine']} (kernel {meta['kernel']}, {meta['cpus']} CPUs), "
        f"reference: `{meta['reference']}`. Interleaved runs; runtime bursts are containerd's "
        f"{result['meta']['containerd_burst']} bits unless stated.",
    ]
    for title, key, fn in (
        ("Steady-state accuracy", "accuracy", accuracy_table),
        ("Burst conformance (ingress, TCP)", "bursts", burst_table),
        ("Latency under load (ping from the pod while one bulk TCP flow saturates a direction)", "latency",
         latency_table),
        ("Fairness (egress, parallel TCP flows in one pod)", "fairness", fairness_table),
        ("Unshaped subnets (TCP goodput; pod shaped at 10 Mbit/s both ways, bwplugin with unshapedSubnets)",
         "subnets", subnets_table),
        ("Subnet mode against plain mode (bwplugin alone, egress or ingress shaped, one bulk TCP flow to the shaped "
         "peer; interleaved)", "subnet_mode", subnet_mode_table),
        ("Cost of ADD and DEL (shaping plugin alone, both directions shaped)", "cost", cost_table),
        ("bwplugin's counting programs on TCX links vs cls_bpf filters (tcAttach; interleaved, one run)",
         "attach", attach_table),
        ("Datapath cost at one offered load (machine-wide CPU busy time; each direction shaped at 1.25× the load, "
         "so that nothing drops)", "datapath", datapath_table),
        ("The bucket at the top (one unpaced TCP flow; bwplugin's maxBurstMs against the reference; interleaved)",
         "top_bucket", top_bucket_table),
    ):  # fmt: skip
        if result.get(key):
            parts += [f"#### {title}", fn(result[key])]
    return "\n\n".join(parts) + "\n"


def _legend(ax: Any, size: int) -> None:
    """A legend only where something was drawn (a run with --only leaves panels empty)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    colors = {"bwplugin": "tab:blue", "reference": "tab:orange"}
    meta = result["meta"]
    fig.suptitle(
        f"bwplugin vs reference bandwidth plugin — {meta['profile']} profile, {meta['date']}, {meta['machine']}"
    )

    ax = axes[0][0]
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in result.get("accuracy", []):
        series[(r["plugin"], r["direction"], r["proto"])].append((r["rate"] / 1e6, r["wire_bps"] / 1e6))
    for (plugin, direction, proto), pts in sorted(series.items()):
        pts.sort()
        style = "-" if direction == "ingress" else "--"
        marker = "o" if proto == "tcp" else "s"
        ax.plot(*zip(*pts, strict=True), style, marker=marker, color=colors[plugin], alpha=0.8,
                label=f"{plugin} {direction} {proto}")  # fmt: skip
    if series:
        lo = min(p[0] for pts in series.values() for p in pts)
        hi = max(p[0] for pts in series.values() for p in pts)
        ax.plot([lo, hi], [lo, hi], ":", color="grey", label="configured")
    ax.set(xscale="log", yscale="log", xlabel="configured Mbit/s", ylabel="achieved on the wire, Mbit/s",
           title="Steady-state rate (tc byte counters)")  # fmt: skip
    _legend(ax, 7)

    ax = axes[0][1]
    for r in result.get("bursts", []):
        if r["burst_label"] != "containerd":
            continue
        ts, bs = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(ts, [b / 1e6 for b in bs], color=colors[r["plugin"]], label=f"{r['plugin']} (containerd burst)")
        ax.plot([0, 2], [0, r["rate"] / 8 * 2 / 1e6], ":", color="grey")
    ax.set(xlabel="seconds after the flow starts", ylabel="MB passed", yscale="symlog",
           title="First 2 s of a TCP flow (dotted: rate × t)")  # fmt: skip
    _legend(ax, 8)

    ax = axes[1][0]
    lat = result.get("latency", [])
    labels = sorted({(r["rate"], r["direction"]) for r in lat})
    width = 0.38
    for i, plugin in enumerate(PLUGINS):
        p50 = [next((r["loaded_p50_ms"] for r in lat if r["plugin"] == plugin and (r["rate"], r["direction"]) == lb),
                    float("nan")) for lb in labels]  # fmt: skip
        p99 = [next((r["loaded_p99_ms"] for r in lat if r["plugin"] == plugin and (r["rate"], r["direction"]) == lb),
                    float("nan")) for lb in labels]  # fmt: skip
        xs = [j + (i - 0.5) * width for j in range(len(labels))]
        ax.bar(xs, p99, width, color=colors[plugin], alpha=0.35, label=f"{plugin} p99")
        ax.bar(xs, p50, width, color=colors[plugin], label=f"{plugin} p50")
    ax.set_xticks(range(len(labels)), [f"{_mbit(r)} Mb {d}" for r, d in labels])
    ax.set(yscale="log", ylabel="ping RTT under load, ms", title="Latency under load")
    _legend(ax, 8)

    ax = axes[1][1]
    cost = [r for r in result.get("cost", []) if "del_ms" in r]
    phases = sorted({r["phase"] for r in cost})
    cost_colors = {"bwplugin (agent)": "tab:blue", "bwplugin (forwarder)": "tab:green",
                   "bwplugin (no agent)": "tab:cyan", "reference": "tab:orange"}  # fmt: skip
    for i, variant in enumerate(COST_VARIANTS):
        rows = {r["phase"]: r for r in cost if r["plugin"] == variant}
        adds = [_p(rows[ph]["add_ms"], 50) if ph in rows else float("nan") for ph in phases]
        dels = [_p(rows[ph]["del_ms"], 50) if ph in rows else float("nan") for ph in phases]
        xs = [j * 2.6 + i * 0.28 for j in range(len(phases))]
        ax.bar(xs, adds, 0.28, color=cost_colors[variant], label=f"{variant} ADD p50")
        ax.bar([x + 1.2 for x in xs], dels, 0.28, color=cost_colors[variant], alpha=0.5, hatch="//",
               label=f"{variant} DEL p50")  # fmt: skip
    ax.set_xticks([j * 2.6 + 1.0 for j in range(len(phases))], phases)
    ax.set(ylabel="ms", yscale="log", title="ADD / DEL wall time (p50; left ADD, right DEL)")
    _legend(ax, 8)

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
