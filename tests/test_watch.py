"""The agent's annotation watch (`bwplugin-agent --watch-pods`), end to end but
for the API server: pods run by a real containerd over CRI (so the attachments
carry the pod's real namespace, name and UID from CNI_ARGS), the real agent with
the official `kubernetes` client, and tests/fake_apiserver.py standing in for
kube-apiserver (none can run here) with the same Pods and annotations. Rates
are read back with `tc -j`, and the agent's counts from its /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from bench.lab.containerd import Containerd

from .fake_apiserver import FakeAPIServer, pod_object
from .test_containerd import ANNOTATED, assert_nothing_left, qdiscs

pytestmark = pytest.mark.kernel
M = 1_000_000
NODE = "bwpt-node-1"
METRICS = "127.0.0.1:19466"


@pytest.fixture
def watched() -> Iterator[tuple[Containerd, FakeAPIServer]]:
    with Containerd() as c, FakeAPIServer(c.node) as api:
        c.agent_args = ("--watch-pods", "--node-name", NODE, "--kubeconfig", api.kubeconfig(str(c.dir / "kubeconfig")),
                        "--metrics-address", METRICS)  # fmt: skip
        c.agent = True  # `bwplugin set` and stats go through it; containerd's ADDs run in-process
        yield c, api


def rate(c: Containerd, dev: str) -> int | None:
    """bits/s of a device's root TBF, read with tc -j (None: no root TBF)."""
    for q in qdiscs(c, dev):
        if q.get("root") and q["kind"] == "tbf":
            return int(q["options"]["rate"]) * 8
    return None


def wait_for(c: Containerd, what: Callable[[], bool], seconds: float) -> float:
    start = time.monotonic()
    while not what():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not within {seconds} s; agent log: {(c.dir / 'agent.log').read_text()[-3000:]}")
        time.sleep(0.02)
    return time.monotonic() - start


def agent_metric(c: Containerd, name: str) -> dict[str, float]:
    text = c.in_node("curl", "-sf", f"http://{METRICS}/metrics").stdout
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_the_watch_applies_annotation_changes_to_running_pods(watched: tuple[Containerd, FakeAPIServer]) -> None:
    c, api = watched
    pod = c.run_pod("web", ANNOTATED, namespace="team-a")  # 10M in, 20M out
    veth = c.host_veth(pod)
    ifb = c.ifb_of(veth)
    web = pod_object("team-a", "web", pod.uid, NODE, ANNOTATED)
    api.put(web)
    api.put(pod_object("team-a", "not-here", "bwpt-uid-elsewhere", NODE, ANNOTATED))  # no attachment: left alone
    c.start_agent()
    wait_for(c, lambda: api.lists() >= 1, 10)
    assert all(q.get("fieldSelector") == [f"spec.nodeName={NODE}"] for q in api.requests), api.requests
    time.sleep(1.0)
    assert (rate(c, veth), rate(c, ifb)) == (10 * M, 20 * M)  # what ADD gave: nothing to change

    timings = {}
    web["metadata"]["annotations"]["kubernetes.io/egress-bandwidth"] = "40M"
    api.put(web)
    timings["modified"] = wait_for(c, lambda: rate(c, ifb) == 40 * M, 2.0)

    web["metadata"]["annotations"]["kubernetes.io/egress-bandwidth"] = "lots"  # malformed: nothing changes
    api.put(web)
    wait_for(c, lambda: "egress='lots'" in (c.dir / "agent.log").read_text(), 2.0)
    assert rate(c, ifb) == 40 * M

    # the API server compacts its history: the open watch gets 410 Gone and the agent lists again
    lists = api.lists()
    api.compact()
    web["metadata"]["annotations"].update({"kubernetes.io/ingress-bandwidth": "5M",
                                           "kubernetes.io/egress-bandwidth": "40M"})  # fmt: skip
    api.put(web)
    timings["after 410"] = wait_for(c, lambda: rate(c, veth) == 5 * M, 2.0)
    assert api.lists() > lists

    # the connection drops (an API server restart): the agent backs off, lists, and carries on
    api.drop()
    del web["metadata"]["annotations"]["kubernetes.io/egress-bandwidth"]  # no annotation: unshaped, as a new pod
    api.put(web)
    timings["after a drop"] = wait_for(c, lambda: not c.ifb_of(veth), 5.0)

    # back to what ADD was given: the override ends
    web["metadata"]["annotations"] = dict(ANNOTATED)
    api.put(web)
    wait_for(c, lambda: rate(c, veth) == 10 * M and rate(c, c.ifb_of(veth) or "lo") == 20 * M, 2.0)
    (row,) = [r for r in json.loads(c.bwplugin("stats", "--json", check=True).stdout) if r["pod"] == "web"]
    assert (row["ingress"]["source"], row["egress"]["source"], row["live_changes"]) == ("runtime", "runtime", 4)
    check = c.cni_check(pod)
    assert check.returncode == 0, check.stdout

    changes = agent_metric(c, "bwplugin_agent_live_changes_total")
    assert changes == {'bwplugin_agent_live_changes_total{origin="watch"}': 4.0}, changes
    errors = agent_metric(c, "bwplugin_agent_watch_errors_total")
    assert errors.get('bwplugin_agent_watch_errors_total{reason="annotation"}') == 1, errors
    assert errors.get('bwplugin_agent_watch_errors_total{reason="gone"}') == 1, errors
    print("watch latency:", {k: f"{v * 1000:.0f} ms" for k, v in timings.items()})

    api.put(web, "DELETED")
    c.remove_pod(pod)
    assert_nothing_left(c)
    assert c.agent_proc is not None and c.agent_proc.poll() is None  # the agent lived through all of it
