"""The agent's /metrics, scraped by a real Prometheus (Debian's, started here with a
private config and data directory, a 1 s scrape interval, listening on loopback
inside the node namespace, where the agent listens too). The pod is run by a
real containerd over CRI with bandwidth annotations, so its namespace and name
labels are the runtime's. It sends UDP at twice its rate; the rate Prometheus
computes from the sent-bytes counter must be the configured rate within 5 %.
Then `bwplugin set` doubles the rate live, and Prometheus must see the new
configured rate within a few scrapes, and the new sent rate after that."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator

import pytest

from bench.lab.containerd import Containerd

pytestmark = pytest.mark.kernel
RATE = 10_000_000
METRICS_PORT, PROMETHEUS_PORT = 19464, 19090
ANNOTATED = {"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "10M"}


@pytest.fixture
def ctrd() -> Iterator[Containerd]:
    with Containerd(agent=True, agent_args=("--metrics-address", f"127.0.0.1:{METRICS_PORT}")) as c:
        yield c


def query(c: Containerd, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?query={urllib.parse.quote(promql)}"
    out = json.loads(c.in_node("curl", "-sf", url).stdout)
    assert out["status"] == "success", out
    return list(out["data"]["result"])


def value(c: Containerd, promql: str) -> float | None:
    try:
        result = query(c, promql)
    except subprocess.CalledProcessError:
        return None  # not listening yet
    return float(result[0]["value"][1]) if len(result) == 1 else None


def within(what: Callable[[], bool], seconds: float) -> float:
    start = time.monotonic()
    while not what():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.25)
    return time.monotonic() - start


def test_a_real_prometheus_scrapes_the_agent_and_sees_live_changes(ctrd: Containerd) -> None:
    assert shutil.which("prometheus"), "prometheus is missing: scripts/test.sh installs Debian's package"
    pod = ctrd.run_pod("web", ANNOTATED, namespace="team-a")
    config = ctrd.dir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: bwplugin\n    static_configs: [{{targets: ['127.0.0.1:{METRICS_PORT}']}}]\n"
    )
    log = open(ctrd.dir / "prometheus.log", "wb")  # noqa: SIM115 (owned by the process)
    prom = subprocess.Popen(
        ["nsenter", f"--net={ctrd.node}", "prometheus", f"--config.file={config}",
         f"--storage.tsdb.path={ctrd.dir / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    gateway = ctrd.gateway(pod)
    server = subprocess.Popen(
        ["nsenter", f"--net={ctrd.node}", "iperf3", "-s", "-1", "-B", gateway, "-p", "5401"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    flow = None
    try:
        within(lambda: bool(ctrd.in_node("ss", "-Hltn", "sport = :5401").stdout.strip()), 10)
        flow = subprocess.Popen(
            ["nsenter", f"--net={pod.netns}", "iperf3", "-c", gateway, "-p", "5401", "-t", "60", "-u",
             "-b", str(4 * RATE), "-l", "1400"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        labels = '{namespace="team-a",pod="web",direction="egress"}'
        sent = f"rate(bwplugin_qdisc_sent_bytes_total{labels}[5s]) * 8"
        within(lambda: value(ctrd, sent) is not None, 30)  # Prometheus starts (its TSDB takes a few s)
        time.sleep(6)  # five scrapes inside the flow fill the 5 s window
        measured = value(ctrd, sent)
        assert measured is not None and abs(measured / RATE - 1) < 0.05, measured
        (series,) = query(ctrd, sent)
        assert series["metric"]["container_id"] == pod.id

        out = ctrd.bwplugin("set", "--pod", "team-a/web", "--egress", "20M")  # through the agent
        assert out.returncode == 0, out.stderr
        seen = within(lambda: value(ctrd, f"bwplugin_rate_bytes_per_second{labels}") == 2 * RATE / 8, 5)
        assert value(ctrd, f"bwplugin_rate_overridden{labels}") == 1
        time.sleep(6)
        measured = value(ctrd, sent)
        assert measured is not None and abs(measured / (2 * RATE) - 1) < 0.05, measured
        assert value(ctrd, 'bwplugin_live_changes_total{namespace="team-a",pod="web"}') == 1
        assert value(ctrd, 'bwplugin_agent_live_changes_total{origin="cli"}') == 1
        assert value(ctrd, 'up{job="bwplugin"}') == 1
        assert value(ctrd, 'bwplugin_agent_requests_total{command="SET",code="0"}') == 1
        adds = value(ctrd, 'bwplugin_agent_requests_total{command="ADD",code="0"}')
        assert adds is not None and adds >= 1
        assert query(ctrd, 'bwplugin_agent_request_seconds_count{command="ADD"}')
        print(f"new configured rate seen by Prometheus {seen:.1f} s after bwplugin set")
        # the agent's whole exposition passes promtool's lint
        exposition = ctrd.in_node("curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics").stdout
        lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    finally:
        for proc in (flow, server):
            if proc is not None:
                proc.kill()
                proc.wait()
        prom.send_signal(signal.SIGTERM)
        prom.wait(timeout=30)
