"""Property-based: whatever the runtime sends, the answer is a spec result or a spec
error with a known code: never a traceback (999), never a crash. CNI_NETNS always
names a path that does not exist, so no input can reach a real interface."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench.lab.lab import Lab, Pod
from bwplugin import cli

from .conftest import bandwidth as runtime_bandwidth
from .conftest import host_veth, shaper
from .oracle import view

KNOWN_CODES = {1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102, 103, 104, 105}
NO_NETNS = "/nonexistent/bwpt-netns"

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
)
json_values = st.recursive(
    st.one_of(numbers, st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
cidrs = st.one_of(
    st.lists(
        st.one_of(
            st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "fd00::/8", "::/0", "0.0.0.0/0", "1.2.3.4", "/", "a/b"]),
            st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(), st.integers(-5, 200)),
            numbers,
        ),
        max_size=70,
    ),
    numbers,
    json_values,
)
bandwidth = st.fixed_dictionaries(
    {},
    optional={
        **{k: numbers for k in ("ingressRate", "ingressBurst", "egressRate", "egressBurst")},
        "shapedSubnets": cidrs,
        "unshapedSubnets": cidrs,
    },
)
configs = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": st.one_of(
            st.sampled_from(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0", "2.0"]), numbers
        ),
        "name": st.one_of(st.text(max_size=300), numbers),
        "type": st.just("bwplugin"),
        "runtimeConfig": st.one_of(
            st.fixed_dictionaries({"bandwidth": st.one_of(bandwidth, json_values)}), json_values
        ),
        "prevResult": st.one_of(
            st.fixed_dictionaries(
                {"cniVersion": st.just("1.0.0")},
                optional={
                    "interfaces": json_values,
                    "ips": st.lists(st.fixed_dictionaries({"address": st.one_of(st.text(max_size=20), numbers)})),
                },
            ),
            json_values,
        ),
        "latencyMs": numbers,
        "shapedSubnets": cidrs,
        "unshapedSubnets": cidrs,
        "egressRedirect": st.one_of(st.sampled_from(["auto", "bpf", "mirred", "MIRRED", ""]), numbers),
        "maxBurstMs": numbers,
        "egressRate": numbers,
        "ingressBurst": numbers,
    },
)
ifnames = st.one_of(st.sampled_from(["eth0", "x" * 15, "x" * 16, ".", "..", "a/b", "a b", "é" * 8, ""]), st.text())
container_ids = st.one_of(st.sampled_from(["abc", "a" * 64, "a" * 1000, "-x", "a b", ""]), st.text(max_size=80))


def check(code: int, out: dict[str, Any] | None) -> None:
    if code == 0:
        assert out is None or isinstance(out, dict)
        json.dumps(out)
        return
    assert code == 1 and isinstance(out, dict)
    assert out["code"] in KNOWN_CODES, out
    assert isinstance(out["msg"], str) and out["msg"]
    assert out["cniVersion"] in ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


@settings(max_examples=300, deadline=None)
@given(
    command=st.sampled_from(["ADD", "CHECK", "VERSION", "FROB", ""]),
    cid=container_ids,
    ifname=ifnames,
    conf=st.one_of(configs, json_values),
)
def test_any_config_and_env_gets_a_spec_answer(command: str, cid: str, ifname: str, conf: Any) -> None:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": NO_NETNS}
    check(*cli.run(env, json.dumps(conf).encode()))


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_on_stdin_get_a_spec_answer(raw: bytes) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": NO_NETNS}
    check(*cli.run(env, raw))


# ---------------------------------------------------------------- DEL, GC and STATUS on a real node

VICTIM_NET = "bwpt-net"
gc_lists = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {}, optional={"containerID": st.one_of(container_ids, numbers), "ifname": st.one_of(ifnames, numbers)}
        ),
        max_size=5,
    ),
    json_values,
)


@pytest.fixture(params=["in-process", "agent"])
def victim(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, Pod]]:
    """A lab node with one shaped pod that no hostile request below names."""
    with Lab(agent=request.param == "agent") as lab:
        pod = lab.pod("victim")
        lab.attach(
            pod, lab.conflist(shaper(), name=VICTIM_NET), runtime_bandwidth(ingress=10_000_000, egress=10_000_000)
        )
        yield lab, pod


def _env_safe(text: str) -> bool:
    return (
        "\0" not in text
        and "=" not in text[:1]
        and text.encode("utf-8", "surrogatepass") == text.encode("utf-8", "ignore")
    )


@pytest.mark.kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["DEL", "GC", "STATUS"]),
    cid=container_ids,
    ifname=ifnames,
    conf=st.one_of(configs, json_values),
    gc_list=gc_lists,
    where=st.sampled_from(["victim", "missing", "unset"]),
)
def test_hostile_del_gc_and_status_answer_and_harm_nothing_they_do_not_name(
    victim: tuple[Lab, Pod], command: str, cid: str, ifname: str, conf: Any, gc_list: Any, where: str
) -> None:
    """The installed executable in the lab's node, beside a shaped pod: whatever a
    DEL, GC or STATUS carries (CNI_NETNS even leading to that pod's netns), the
    answer is a spec answer, and the pod it does not name stays shaped."""
    lab, pod = victim
    assert pod.attachment is not None
    assume(_env_safe(cid) and _env_safe(ifname) and cid != pod.attachment.container_id)
    if isinstance(conf, dict):
        assume(conf.get("name") != VICTIM_NET)  # a GC of the victim's own network may rightly remove it
        if command == "GC":
            conf = {**conf, "cni.dev/valid-attachments": gc_list}
    netns = {"victim": pod.netns, "missing": NO_NETNS, "unset": ""}[where]
    inv = lab.runtime.exec("bwplugin", command, json.dumps(conf).encode(), container_id=cid, netns=netns, ifname=ifname)
    out = json.loads(inv.stdout) if inv.stdout.strip() else None
    check(inv.rc, out)
    kv = view(lab.node)
    veth = host_veth(pod)
    assert kv.tbf(veth) is not None and len(kv.ifbs()) == 1, (command, conf, kv.qdiscs)
