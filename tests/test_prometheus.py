"""The agent's /metrics, scraped by a real Prometheus (Debian's, started here with a
private config and data directory, a 1 s scrape interval, listening on loopback
inside the lab's node namespace, as the agent does). A pod shaped at RATE sends
UDP at twice that; the rate Prometheus computes from the sent-bytes counter must be
the configured rate within 5 %, and the agent's request metrics must be there."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from bench.lab.lab import Lab

from .conftest import bandwidth, shaper

pytestmark = pytest.mark.kernel
RATE = 10_000_000
METRICS_PORT, PROMETHEUS_PORT = 19464, 19090


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        the_lab.start_agent("--metrics-address", f"127.0.0.1:{METRICS_PORT}")
        the_lab.use_agent = True
        the_lab.runtime.extra_env.pop("BWPLUGIN_NO_AGENT", None)
        the_lab.runtime.extra_env["BWPLUGIN_AGENT_SOCKET"] = the_lab.agent_socket
        yield the_lab


def query(lab: Lab, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?query={urllib.parse.quote(promql)}"
    out = json.loads(lab.run(lab.node, "curl", "-sf", url).stdout)
    assert out["status"] == "success", out
    return list(out["data"]["result"])


def scraped(lab: Lab) -> bool:
    try:
        return bool(query(lab, "bwplugin_qdisc_sent_bytes_total"))
    except subprocess.CalledProcessError:
        return False  # not listening yet


def test_a_real_prometheus_scrapes_the_agent_and_sees_the_rate(lab: Lab) -> None:
    assert shutil.which("prometheus"), "prometheus is missing: scripts/setup.sh installs Debian's package"
    conflist = lab.conflist(shaper())
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE), container_id=f"{pod.name}-cid")
    config = lab.tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: bwplugin\n    static_configs: [{{targets: ['127.0.0.1:{METRICS_PORT}']}}]\n"
    )
    log = open(lab.tmp / "prometheus.log", "wb")  # noqa: SIM115 (owned by the process)
    prom = subprocess.Popen(
        ["nsenter", f"--net={lab.node}", "prometheus", f"--config.file={config}",
         f"--storage.tsdb.path={lab.tmp / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    try:
        lab.iperf_server(peer)
        flow = lab.spawn(pod.netns, "iperf3", "-c", peer.ip, "-t", "40", "-u", "-b", str(2 * RATE), "-l", "1400")
        started = time.monotonic()
        promql = 'rate(bwplugin_qdisc_sent_bytes_total{direction="egress"}[5s]) * 8'
        while not scraped(lab) and time.monotonic() - started < 30:
            time.sleep(0.5)  # Prometheus is starting (its TSDB takes a few seconds here)
        time.sleep(6)  # five scrapes inside the flow fill the 5 s window
        rate = query(lab, promql)
        assert rate, (lab.tmp / "prometheus.log").read_text()[-2000:]
        (series,) = rate
        assert series["metric"]["container_id"] == f"{pod.name}-cid"
        assert abs(float(series["value"][1]) / RATE - 1) < 0.05, series
        flow.kill()
        up = query(lab, 'up{job="bwplugin"}')
        assert up and up[0]["value"][1] == "1"
        adds = query(lab, 'bwplugin_agent_requests_total{command="ADD",code="0"}')
        assert adds and float(adds[0]["value"][1]) >= 2  # the peer's and the pod's
        assert query(lab, 'bwplugin_agent_request_seconds_count{command="ADD"}')
        # the agent's whole exposition passes promtool's lint
        exposition = lab.run(lab.node, "curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics").stdout
        lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.wait(timeout=30)
