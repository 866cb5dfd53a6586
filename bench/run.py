"""Run a benchmark profile and write <out>/<profile>.{json,md,png}.

python -m bench --profile quick       # a few minutes
python -m bench --profile full        # longer: more rates, repeats and pods
python -m bench --profile top         # accuracy at 5 and 10 Gbit/s only (~3 minutes)
python -m bench --only cost --background 2000   # ADD/DEL time with 2000 pods of each plugin held
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.lab.lab import CONTAINERD_BURST, Lab

from . import report, scenarios
from .harness import CRIO_BURST, Bench, progress

M = 1_000_000
TOP_TCP = [1000 * M, 10000 * M]  # the datapath section's bulk TCP loads
RUNTIME_BURSTS = {"containerd": CONTAINERD_BURST, "cri-o": CRIO_BURST, "small": 80_000}
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "accuracy": {"rates": [10 * M], "protos": ["tcp"], "repeats": 1, "seconds": 2},
        "bursts": {"rate": 10 * M, "burst_sets": {"containerd": CONTAINERD_BURST}},
        "latency": {"rates": [10 * M], "count": 20},
        "fairness": {"rate": 10 * M, "flow_counts": [4], "seconds": 1},
        "subnets": {"rate": 10 * M, "seconds": 1},
        "subnet_mode": {"rates": [10 * M], "count": 20, "repeats": 1, "seconds": 1},
        "cost": {"pods": 5, "background": 0},
        "attach": {"rates": [10 * M], "seconds": 1, "pods": 2},
        "datapath": {"udp_share": 0.6, "udp_length": 64, "tcp_rates": [], "repeats": 1, "seconds": 1},
    },
    "quick": {
        "accuracy": {"rates": [1 * M, 10 * M, 100 * M, 1000 * M], "protos": ["tcp", "udp"], "repeats": 1, "seconds": 3},
        "bursts": {"rate": 10 * M, "burst_sets": RUNTIME_BURSTS},
        "latency": {"rates": [10 * M, 100 * M], "count": 60},
        "fairness": {"rate": 100 * M, "flow_counts": [4, 16], "seconds": 3},
        "subnets": {"rate": 10 * M, "seconds": 3},
        "subnet_mode": {"rates": [10 * M, 100 * M], "count": 60, "repeats": 1, "seconds": 3},
        "cost": {"pods": 20, "background": 200},
        "attach": {"rates": [100 * M, 1000 * M], "seconds": 3, "pods": 20},
        "datapath": {"udp_share": 0.6, "udp_length": 64, "tcp_rates": TOP_TCP, "repeats": 3, "seconds": 3},
    },
    "full": {
        "accuracy": {
            "rates": [1 * M, 10 * M, 100 * M, 1000 * M, 2000 * M, 5000 * M],
            "protos": ["tcp", "udp"],
            "repeats": 3,
            "seconds": 5,
        },
        "bursts": {"rate": 10 * M, "burst_sets": RUNTIME_BURSTS},
        "latency": {"rates": [10 * M, 100 * M, 1000 * M], "count": 100},
        "fairness": {"rate": 100 * M, "flow_counts": [4, 16], "seconds": 5},
        "subnets": {"rate": 10 * M, "seconds": 5},
        "subnet_mode": {"rates": [10 * M, 100 * M, 1000 * M], "count": 100, "repeats": 3, "seconds": 5},
        "cost": {"pods": 50, "background": 500},
        "attach": {"rates": [100 * M, 1000 * M, 5000 * M], "seconds": 5, "pods": 50},
        "datapath": {"udp_share": 0.6, "udp_length": 64, "tcp_rates": TOP_TCP, "repeats": 5, "seconds": 5},
    },
    # issue 17's accuracy at the top: only the rates where the machine itself runs out
    "top": {
        "accuracy": {"rates": [5000 * M, 10000 * M], "protos": ["tcp", "udp"], "repeats": 2, "seconds": 4},
        "top_bucket": {"rates": [10000 * M], "repeats": 3, "seconds": 4},
    },
}


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ref = subprocess.run(["/usr/lib/cni/bandwidth"], capture_output=True, text=True, env={"CNI_COMMAND": "VERSION"})
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "containernetworking-plugins"],
                             capture_output=True, text=True).stdout  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{model}",
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "reference": f"/usr/lib/cni/bandwidth, Debian containernetworking-plugins {version}".strip()
        + ("" if ref.returncode == 0 else " (VERSION failed)"),
        "containerd_burst": CONTAINERD_BURST,
    }


def run(profile: str, out: Path, only: list[str] | None = None, background: int | None = None) -> dict[str, Any]:
    spec = PROFILES[profile]
    if background is not None:  # the cost section's pods held shaped while ADD/DEL are timed
        spec = {**spec, "cost": {**spec["cost"], "background": background}}
    result: dict[str, Any] = {"meta": {"profile": profile, **machine()}}
    started = time.monotonic()
    with Lab(agent=True) as lab:
        bench = Bench(lab)
        for name, fn in (
            ("accuracy", scenarios.accuracy),
            ("bursts", scenarios.bursts),
            ("latency", scenarios.latency),
            ("fairness", scenarios.fairness),
            ("subnets", scenarios.subnets),
            ("subnet_mode", scenarios.subnet_mode),
            ("cost", scenarios.cost),
            ("attach", scenarios.attach_paths),
            ("datapath", scenarios.datapath),
            ("top_bucket", scenarios.top_bucket),
        ):
            if (only and name not in only) or name not in spec:
                continue
            progress(f"== {name}")
            result[name] = fn(bench, **spec[name])
    result["meta"]["seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{profile}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{profile}.md").write_text(report.markdown(result))
    report.plot(result, str(out / f"{profile}.png"))
    progress(f"wrote {out}/{profile}.json, .md and .png in {result['meta']['seconds']} s")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    sections = sorted({name for spec in PROFILES.values() for name in spec})
    parser.add_argument("--only", nargs="*", help="run only these sections", choices=sections)
    parser.add_argument("--background", type=int, help="pods of each plugin held shaped in the cost section")
    args = parser.parse_args()
    result = run(args.profile, args.out, args.only, args.background)
    print(report.markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
