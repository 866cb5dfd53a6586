"""Pure parts of live changes: Kubernetes quantities (checked against the official
client's own parser), the change document's validation, the planning of a new
shaping record, the record's layout against the C struct (compiled by gcc), the
names derived from map hashes, and the annotation watch's reconcile logic. No
root needed."""

from __future__ import annotations

import json
import re
import subprocess
from decimal import ROUND_CEILING
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.utils.quantity import parse_quantity as k8s_quantity

from bwplugin.cni.change import parse_change, parse_quantity
from bwplugin.cni.errors import InvalidConfigError
from bwplugin.commands.live import DEFAULT_BURST, plan
from bwplugin.datapath import bpf, naming
from bwplugin.node.watch import PodWatcher, desired

C_SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "bwplugin.c"
M = 1_000_000


@pytest.mark.parametrize(
    "text", ["10M", "1.5G", "512Ki", "100", "1e3", "2E6", "0.5k", "1500m", "3Gi", "+7M", ".5M", "1P", "123456789"]
)
def test_quantities_read_as_the_kubernetes_client_reads_them(text: str) -> None:
    assert parse_quantity("q", text) == int(k8s_quantity(text).to_integral_value(rounding=ROUND_CEILING))


@given(st.from_regex(r"\A[0-9]{1,6}(\.[0-9]{1,3})?(Ki|Mi|Gi|Ti|k|M|G|T|P|m|e[0-9]|E[0-9])?\Z", fullmatch=True))
def test_any_quantity_of_the_grammar_reads_as_the_client_does(text: str) -> None:
    assert parse_quantity("q", text) == int(k8s_quantity(text).to_integral_value(rounding=ROUND_CEILING))


@pytest.mark.parametrize("text", ["", "M", "10 M", "10MB", "ten", "1..5", "0x10", None, 10])
def test_what_is_no_quantity_names_the_field(text: Any) -> None:
    with pytest.raises(InvalidConfigError, match=r"egress=.* is not a Kubernetes quantity"):
        parse_quantity("egress", text)


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"pod": "a/b", "egress": "10Q"}, "egress='10Q'"),
        ({"pod": "a/b", "egress": "999"}, "outside 1k..1P"),
        ({"pod": "a/b", "egress": "2P"}, "outside 1k..1P"),
        ({"pod": "a/b", "egress": "none", "egressBurst": "1M"}, "egressBurst='1M' is given but egress is 'none'"),
        ({"pod": "a/b", "ingressBurst": "40G"}, "ingressBurst='40G'"),
        ({"pod": "a/b"}, "nothing to change"),
        ({"egress": "1M"}, "select the attachment"),
        ({"pod": "ab", "egress": "1M"}, "pod='ab' must be NAMESPACE/NAME"),
        ({"pod": "a/b/c", "egress": "1M"}, "pod='a/b/c'"),
        ({"pod": "a/b", "egress": "1M", "rate": 5}, "unknown key(s) 'rate'"),
        ({"pod": "a/b", "ifname": "eth0/1", "egress": "1M"}, "ifname='eth0/1'"),
        ({"pod": "a/b", "reset": True, "egress": "1M"}, "reset goes alone"),
        ({"pod": "a/b", "reset": "yes"}, "reset must be true or false"),
        ({"pod": "a/b", "egress": "1M", "origin": "kubelet"}, "origin='kubelet'"),
        ({"pod": "a/b", "shapedSubnets": ["10.0.0.0/8"], "unshapedSubnets": []}, "mutually exclusive"),
        ({"pod": "a/b", "shapedSubnets": ["10.0.0.1/8"]}, "shapedSubnets[0]='10.0.0.1/8'"),
        ({"pod": "a/b", "egress": 10}, "egress=10 is not a Kubernetes quantity"),
    ],
)
def test_bad_changes_are_code_7_naming_the_field(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidConfigError) as err:
        parse_change(doc)
    assert err.value.code == 7 and words in err.value.msg, err.value.msg


def test_a_change_reads_rates_bursts_none_and_subnets() -> None:
    c = parse_change({"container": "abc", "ingress": "30M", "ingressBurst": "1Mi", "egress": "none",
                      "unshapedSubnets": ["10.0.0.0/8"]})  # fmt: skip
    assert (c.ingress.rate, c.ingress.burst, c.egress.rate, c.egress.burst) == (30 * M, 2**20, 0, None)
    assert c.subnets is not None and not c.subnets.listed_shaped and c.subnets.networks == (ip_network("10.0.0.0/8"),)
    assert c.selector.container == "abc" and c.origin == "cli"


def record(add: tuple[tuple[int, int], tuple[int, int]], flags: int = 0) -> bpf.ShapingEntry:
    return bpf.ShapingEntry(add, add, 0, 25000, 10000, 1500, 65536, flags)


ENTRY = bpf.AttachEntry(0, 3, bpf.F_INGRESS_SHAPED, 1, 2, "eth0", "cid")


def test_a_direction_is_overridden_exactly_while_it_differs_from_add() -> None:
    old = record(((10 * M, 4294967295), (0, 0)))
    new = plan(old, ENTRY, parse_change({"pod": "a/b", "egress": "20M"}))
    assert new.now == ((10 * M, 4294967295), (20 * M, DEFAULT_BURST))  # shaped anew: the runtimes' burst
    assert new.flags & bpf.S_OVERRIDES == bpf.S_EGRESS_OVERRIDE
    same = plan(new, ENTRY, parse_change({"pod": "a/b", "ingress": "10M"}))  # ADD's value again: not an override
    assert same.flags & bpf.S_INGRESS_OVERRIDE == 0
    back = plan(new, ENTRY, parse_change({"pod": "a/b", "egress": "none"}))
    assert back.now == old.now and back.flags & bpf.S_OVERRIDES == 0
    burst = plan(old, ENTRY, parse_change({"pod": "a/b", "ingressBurst": "8k"}))
    assert burst.now[0] == (10 * M, 8000)
    reset = plan(plan(old, ENTRY, parse_change({"pod": "a/b", "ingress": "1M"})), ENTRY,
                 parse_change({"pod": "a/b", "reset": True}))  # fmt: skip
    assert reset.now == old.add and reset.flags & bpf.S_OVERRIDES == 0


def test_a_burst_alone_cannot_shape_an_unshaped_direction() -> None:
    with pytest.raises(InvalidConfigError, match="egressBurst is given but egress is not shaped"):
        plan(record(((10 * M, 80000), (0, 0))), ENTRY, parse_change({"pod": "a/b", "egressBurst": "1M"}))


def test_the_watch_leaves_static_rates_alone_and_subnets_need_an_htb() -> None:
    static = record(((10 * M, 80000), (0, 0)), bpf.S_STATIC)
    assert plan(static, ENTRY, parse_change({"pod": "a/b", "egress": "5M", "origin": "watch"})) == static
    assert plan(static, ENTRY, parse_change({"pod": "a/b", "egress": "5M"})).now[1][0] == 5 * M  # a person may
    with pytest.raises(InvalidConfigError, match="plain TBF"):
        plan(static, ENTRY, parse_change({"pod": "a/b", "shapedSubnets": ["10.0.0.0/8"]}))
    split = plan(static, bpf.AttachEntry(0, 3, bpf.F_SUBNETS, 1, 2, "eth0", "cid"),
                 parse_change({"pod": "a/b", "shapedSubnets": ["10.0.0.0/8"]}))  # fmt: skip
    assert split.flags & (bpf.S_SUBNETS_OVERRIDE | bpf.S_SHAPED_LIST) == bpf.S_SUBNETS_OVERRIDE | bpf.S_SHAPED_LIST
    assert split.subnets_digest == bpf.subnets_digest([ip_network("10.0.0.0/8")])


def test_the_shaping_record_round_trips_and_matches_the_c_struct_as_gcc_lays_it_out(tmp_path: Path) -> None:
    e = bpf.ShapingEntry(((1, 2), (3, 4)), ((5, 6), (7, 8)), 2**64 - 1, 25000, 10000, 9000, 185000, 0x7F, 3)
    assert bpf.ShapingEntry.unpack(e.pack()) == e
    struct_src = re.search(r"struct bwp_shaping \{.*?\};", C_SOURCE.read_text(), re.S)
    assert struct_src is not None
    fields = ["add_rate", "add_burst", "rate", "burst", "subnets_digest", "latency_us", "max_burst_us", "mtu",
              "gso_max", "flags", "changes"]  # fmt: skip
    prog = tmp_path / "layout.c"
    prog.write_text(
        "#include <stdio.h>\n#include <stddef.h>\ntypedef unsigned long long __u64; typedef unsigned int __u32;\n"
        + struct_src.group(0)
        + '\nint main(void) { printf("%zu", sizeof(struct bwp_shaping));'
        + "".join(f' printf(" %zu", offsetof(struct bwp_shaping, {f}));' for f in fields)
        + " return 0; }\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(prog)], check=True)
    size, *offsets = map(int, subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                                             check=True).stdout.split())  # fmt: skip
    assert size == bpf.SHAPING_VAL.size
    # Python's pack order: add rates, add bursts, rates, bursts (each [ingress, egress]), then the rest
    assert offsets == [0, 16, 32, 48, 64, 72, 76, 80, 84, 88, 92]


def test_names_follow_from_the_map_hashes_alone() -> None:
    for network, cid, ifname in (("pods", "abc", "eth0"), ("n" * 200, "c" * 64, "net1")):
        assert naming.ifb_name_of_owner(bpf.owner_hash(network, cid, ifname)) == naming.ifb_name(network, cid, ifname)
        assert naming.network_tag_of(bpf.network_hash(network)) == naming.network_tag(network)


def pod(annotations: dict[str, str], uid: str = "u1") -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": "web", "uid": uid, "annotations": annotations}}


def test_the_watch_asks_for_what_the_annotations_say_and_only_when_they_change() -> None:
    assert desired(pod({"kubernetes.io/egress-bandwidth": "20M"})) == {
        "pod": "team-a/web", "origin": "watch", "ingress": "none", "egress": "20M"
    }  # fmt: skip
    calls: list[dict[str, Any]] = []
    counts: list[tuple[str, str]] = []
    answers = iter([(0, {"changed": True}), (1, {"code": 7, "msg": "egress='lots' is not"}), (1, {"code": 3})])

    def apply(request: bytes) -> tuple[int, dict[str, Any]]:
        calls.append(json.loads(request))
        return next(answers)

    w = PodWatcher("n", apply, lambda _m: None, lambda m, label: counts.append((m, label)))
    w.reconcile(pod({"kubernetes.io/egress-bandwidth": "20M"}))
    w.reconcile(pod({"kubernetes.io/egress-bandwidth": "20M"}))  # a status update: nothing asked
    w.reconcile(pod({"kubernetes.io/egress-bandwidth": "lots"}))
    w.reconcile(pod({"kubernetes.io/egress-bandwidth": "lots"}))  # still bad: not asked again
    w.reconcile(pod({}, uid="u2"))  # no attachment here
    assert [c["egress"] for c in calls] == ["20M", "lots", "none"]
    assert counts == [("applied", ""), ("errors", "annotation")]
