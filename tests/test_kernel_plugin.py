"""bwplugin on real namespaces, veths, ifbs and eBPF, run as a runtime runs it:
the installed executable, chained after Debian's reference ptp/bridge plugins."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bench.lab.lab import Lab, Pod
from bench.lab.libcni import PluginFailed, plugin_conf
from bench.lab.measure import TCP_GOODPUT_CEILING, Sampler, iperf_goodput
from bwplugin.datapath import bpf
from bwplugin.datapath.naming import ifb_name, parse_alias
from bwplugin.datapath.tc import TBF_HANDLE

from .conftest import bandwidth, host_veth, shaper
from .oracle import after_handover, handed_over, kernel_has_tcx, link_pins, pinned_ids, settled_ifbs, tcx_chain, view

pytestmark = pytest.mark.kernel
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
TCX = kernel_has_tcx()  # tcAttach "auto" then counts with TCX links


def shaper_conf(pod: Pod, command_result: bool = True) -> dict:
    att = pod.attachment
    plugin = att.conflist["plugins"][-1]
    return plugin_conf(att.conflist, plugin, att.result if command_result else None, att.runtime_config)


def map_ids() -> set[int]:
    fd = bpf.open_map()
    if fd is None:
        return set()
    try:
        return set(bpf.attach_entries(fd))
    finally:
        os.close(fd)


def attach_id_of(lab: Lab, pod: Pod) -> int:
    name = ifb_name(pod.attachment.conflist["name"], pod.attachment.container_id, pod.attachment.ifname)
    label = parse_alias(view(lab.node).links[name]["alias"])
    assert label is not None
    return label.attach_id


def assert_clean(lab: Lab, veth: str | None = None) -> None:
    assert settled_ifbs(lab.node) == []
    assert link_pins() == []
    kv = view(lab.node)
    if veth and veth in kv.links:
        assert kv.tbf(veth) is None
        assert not kv.has_clsact(veth)


# ---------------------------------------------------------------- ADD / CHECK / DEL


@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_every_version(lab: Lab, version: str) -> None:
    pod = lab.pod("a")
    before = map_ids()
    att = lab.attach(pod, lab.conflist(shaper(), version), bandwidth(ingress=10_000_000, egress=20_000_000))
    res = att.result
    assert res["cniVersion"] == version
    veth = host_veth(pod)
    ifb = ifb_name("bwpt-net", att.container_id, "eth0")
    assert res["interfaces"][-1]["name"] == ifb
    if version < "1.0.0":
        assert res["ips"][0]["version"] == "4"
    else:
        assert "version" not in res["ips"][0]

    kv = view(lab.node)
    ingress = kv.tbf(veth)
    assert ingress and ingress["handle"] == TBF_HANDLE and ingress["rate"] == 1_250_000
    assert ingress["limit"] == 31_250  # 25 ms at 10 Mbit/s, not rate*25ms + 512 MiB
    egress = kv.tbf(ifb)
    assert egress and egress["rate"] == 2_500_000
    assert kv.has_clsact(veth)
    # counting first on both hooks, the redirect last (cls_bpf prio 0xfb0d): other
    # tools' filters in between see the pod's packets; all direct action. On a
    # kernel with TCX, links count, ahead of every clsact filter
    if TCX:
        if lab.agent is not None:  # ADD answered with cls_bpf counting; the agent moves it to TCX right after
            handed_over(lab.node, veth)
            kv = view(lab.node)
        (flt,) = kv.filters[veth]
        assert veth not in kv.out_filters
        chains = {hook: tcx_chain(lab.node, veth, hook) for hook in ("ingress", "egress")}
        assert chains == {"ingress": ["bwp_tcx_from_pod"], "egress": ["bwp_tcx_to_pod"]}
        assert len(link_pins()) == 2
    else:
        count, flt = kv.filters[veth]
        assert count["name"].startswith("bwplugin:bwp_count_from_pod_") and count["flags"] == 1
        assert count["prio"] == 0xB0D and count["classid"] == flt["classid"]
        (out_flt,) = kv.out_filters[veth]
        assert out_flt["name"].startswith("bwplugin:bwp_to_pod_") and out_flt["prio"] == 0xB0D
        assert out_flt["classid"] == flt["classid"]
    assert flt["name"].startswith("bwplugin:bwp_from_pod_") and flt["flags"] == 1 and flt["prio"] == 0xFB0D
    label = parse_alias(kv.links[ifb]["alias"])
    assert label and label.attach_id == flt["classid"] and label.host_index == kv.links[veth]["index"]
    fd = bpf.open_map()
    entry = bpf.attach_get(fd, label.attach_id)
    os.close(fd)
    assert entry and entry.ifb_index == kv.links[ifb]["index"] and entry.host_index == kv.links[veth]["index"]
    assert (entry.container_id, entry.ifname) == (att.container_id, "eth0")
    assert entry.owner == bpf.owner_hash("bwpt-net", att.container_id, "eth0")

    if version >= "0.4.0":
        att.check()

    inv = lab.exec_shaper("DEL", pod, shaper_conf(pod))
    assert (inv.rc, inv.stdout) == (0, "")
    assert_clean(lab, veth)
    assert map_ids() == before
    att.delete()


@pytest.mark.parametrize("version", ["0.3.1", "1.0.0"])
def test_no_bandwidth_passes_prev_result_through(lab: Lab, version: str) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None, version))  # ptp alone
    conf = plugin_conf(att.conflist, shaper(), att.result, None)
    inv = lab.exec_shaper("ADD", pod, conf)
    assert inv.rc == 0
    assert json.loads(inv.stdout) == att.result  # same version in and out: unchanged
    assert view(lab.node).ifbs() == []


def test_static_config_wins_over_runtime(lab: Lab) -> None:
    pod = lab.pod("a")
    static = shaper(egressRate=5_000_000, egressBurst=400_000)
    att = lab.attach(pod, lab.conflist(static), bandwidth(ingress=10_000_000))
    kv = view(lab.node)
    assert kv.tbf(host_veth(pod)) is None  # runtime ingress ignored
    assert kv.tbf(att.result["interfaces"][-1]["name"])["rate"] == 625_000
    att.check()


def test_runtime_config_used_without_static(lab: Lab) -> None:
    pod = lab.pod("a")
    lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000))
    kv = view(lab.node)
    veth = host_veth(pod)
    assert kv.tbf(veth)["rate"] == 1_250_000
    assert kv.ifbs() == []
    # the pod's egress is only counted: its redirect filter has no ifb to redirect to
    flt = kv.filters[veth][-1]
    fd = bpf.open_map()
    entry = bpf.attach_get(fd, flt["classid"])
    os.close(fd)
    assert entry and entry.ifb_index == 0 and entry.flags == bpf.F_INGRESS_SHAPED | bpf.F_COUNTING


def test_burst_cap_and_raise_are_reported_on_stderr(lab: Lab) -> None:
    """What the README promises: a runtime's huge default burst is capped (and said so),
    a burst below a few frames is raised (and said so), on the plugin's stderr, which
    runtimes keep; through the agent too (its log lines travel back with the reply)."""
    conflist = lab.conflist(shaper())
    pod = lab.pod("big")
    big = lab.attach(pod, conflist, {"bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 4294967295}})
    assert "ingress burst 536870911 B capped to 12500 B (maxBurstMs=10)" in big.logs["bwplugin:ADD"], big.logs
    assert kv_burst(lab, host_veth(pod)) == 12_500
    tiny = lab.attach(lab.pod("tiny"), conflist, {"bandwidth": {"egressRate": 1_000_000, "egressBurst": 8}})
    assert "egress burst 1 B raised to the floor of 6056 B" in tiny.logs["bwplugin:ADD"], tiny.logs
    plain = lab.attach(lab.pod("plain"), conflist, {"bandwidth": {"egressRate": 10**7, "egressBurst": 100_000}})
    assert "burst" not in plain.logs["bwplugin:ADD"], plain.logs


def kv_burst(lab: Lab, dev: str) -> int:
    """The TBF's bucket in bytes, read with tc -j (not bwplugin's reader)."""
    (q,) = [q for q in json.loads(lab.run(lab.node, "tc", "-j", "qdisc", "show", "dev", dev).stdout) if q.get("root")]
    return int(q["options"]["burst"])


def test_egress_only(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=3_000_000))
    kv = view(lab.node)
    assert kv.tbf(host_veth(pod)) is None
    assert kv.tbf(att.result["interfaces"][-1]["name"])["rate"] == 375_000
    att.check()


def test_two_pods_shaped_differently(lab: Lab) -> None:
    conflist = lab.conflist(shaper())
    a, b = lab.pod("a"), lab.pod("b")
    lab.attach(a, conflist, bandwidth(ingress=10_000_000, egress=2_000_000))
    lab.attach(b, conflist, bandwidth(ingress=50_000_000, egress=30_000_000))
    kv = view(lab.node)
    assert kv.tbf(host_veth(a))["rate"] == 1_250_000
    assert kv.tbf(host_veth(b))["rate"] == 6_250_000
    assert kv.tbf(a.attachment.result["interfaces"][-1]["name"])["rate"] == 250_000
    assert kv.tbf(b.attachment.result["interfaces"][-1]["name"])["rate"] == 3_750_000
    a.attachment.delete()
    a.attachment = None
    b.attachment.check()  # deleting one pod left the other intact
    assert len(settled_ifbs(lab.node)) == 1


def test_bridge_chain(lab: Lab) -> None:
    pod = lab.pod("a")
    bridge = {
        "type": "bridge",
        "bridge": f"bwpt{lab.tag}br",
        "isGateway": True,
        "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": "10.234.1.0/24", "dataDir": str(lab.tmp / "ipam-br")},
    }
    conflist = {"cniVersion": "1.0.0", "name": "bwpt-br", "plugins": [bridge, shaper()]}
    att = lab.attach(pod, conflist, bandwidth(ingress=10_000_000, egress=20_000_000))
    veth = next(i["name"] for i in att.result["interfaces"] if i["name"].startswith("veth"))
    kv = view(lab.node)
    assert kv.tbf(veth)["rate"] == 1_250_000 and kv.has_clsact(veth)
    att.check()
    att.delete()
    pod.attachment = None
    assert settled_ifbs(lab.node) == []


# ---------------------------------------------------------------- DEL is best effort


def test_del_twice_and_without_prev_result(lab: Lab) -> None:
    pod = lab.pod("a")
    lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    veth = host_veth(pod)
    conf = shaper_conf(pod, command_result=False)
    for _ in range(2):
        inv = lab.exec_shaper("DEL", pod, conf)
        assert (inv.rc, inv.stdout) == (0, "")
    assert_clean(lab, veth)


def test_del_whose_netns_leads_to_another_pod_leaves_that_pod_alone(lab: Lab) -> None:
    """Without prevResult, CNI_NETNS (a reused /proc/<pid>/ns/net, say) can lead to
    another pod's veth: DEL touches a veth only with proof that it is this
    attachment's (its map entry or its ifb), so pod b stays shaped."""
    a, b = lab.pod("a"), lab.pod("b")
    conflist = lab.conflist(shaper())
    lab.attach(a, conflist, bandwidth(ingress=10_000_000, egress=10_000_000))
    att_b = lab.attach(b, conflist, bandwidth(ingress=20_000_000, egress=20_000_000))
    veth_a = host_veth(a)
    conf = shaper_conf(a, command_result=False)
    inv = lab.runtime.exec(
        "bwplugin", "DEL", conf, container_id=a.attachment.container_id, netns=b.netns, ifname="eth0"
    )  # a's container ID and network, b's netns
    assert (inv.rc, inv.stdout) == (0, ""), inv.stderr
    att_b.check()  # b untouched
    # a's objects, found by its map entries, are gone; b's ifb is the only one left
    assert settled_ifbs(lab.node) == [att_b.result["interfaces"][-1]["name"]]
    kv = view(lab.node)
    assert kv.tbf(veth_a) is None and not kv.has_clsact(veth_a)


def test_del_after_netns_is_gone(lab: Lab) -> None:
    pod = lab.pod("a")
    lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=10_000_000))
    attach_id = attach_id_of(lab, pod)
    conf = shaper_conf(pod)
    after_handover(lab.node, host_veth(pod), through_agent=lab.agent is not None)  # the links exist from then
    subprocess.run(["ip", "netns", "del", pod.name], check=True)  # veth pair dies with it
    assert len(link_pins()) == (2 if TCX else 0)  # defunct links: their device is gone, their pins are not
    inv = lab.exec_shaper("DEL", pod, conf)
    assert inv.rc == 0, inv.stdout
    assert settled_ifbs(lab.node) == []
    assert attach_id not in map_ids()
    assert link_pins() == []


def test_del_with_cni_netns_unset_cleans_by_the_attachment_alone(lab: Lab) -> None:
    """The spec lets a runtime send DEL without CNI_NETNS (a netns already gone,
    never made): the attachment is found by container ID, network and ifname."""
    pod, other = lab.pod("a"), lab.pod("b")
    conflist = lab.conflist(shaper())
    lab.attach(pod, conflist, bandwidth(ingress=10_000_000, egress=10_000_000))
    lab.attach(other, conflist, bandwidth(ingress=20_000_000))
    veth, ids = host_veth(pod), pinned_ids(f"attach_v{bpf.MAP_LAYOUT}")
    assert len(ids) == 2
    for prev in (True, False):  # the runtime's DEL with its cached result, then a retry without one
        conf = shaper_conf(pod, command_result=prev)
        inv = lab.runtime.exec("bwplugin", "DEL", conf, container_id=pod.attachment.container_id, ifname="eth0")
        assert (inv.rc, inv.stdout) == (0, ""), inv.stderr
    kv = view(lab.node)
    assert kv.tbf(veth) is None and not kv.has_clsact(veth)
    assert len(settled_ifbs(lab.node)) == 0  # b is shaped toward the pod only: no ifb of its own
    assert len(pinned_ids(f"attach_v{bpf.MAP_LAYOUT}")) == 1  # b's entry
    other.attachment.check()


def test_del_with_invalid_bandwidth_config_still_cleans(lab: Lab) -> None:
    pod = lab.pod("a")
    lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=10_000_000))
    conf = {**shaper_conf(pod), "egressRate": -5}
    inv = lab.exec_shaper("DEL", pod, conf)
    assert inv.rc == 0, inv.stdout
    assert settled_ifbs(lab.node) == []


@pytest.mark.parametrize("removed", ["ifb", "clsact", "tbf", "map"])
def test_del_partial_state(lab: Lab, removed: str) -> None:
    pod = lab.pod("a")
    lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    veth, ifb = host_veth(pod), pod.attachment.result["interfaces"][-1]["name"]
    attach_id = attach_id_of(lab, pod)
    if removed == "ifb":
        lab.run(lab.node, "ip", "link", "del", ifb)
    elif removed == "clsact":
        lab.run(lab.node, "tc", "qdisc", "del", "dev", veth, "clsact")
    elif removed == "tbf":
        lab.run(lab.node, "tc", "qdisc", "del", "dev", veth, "root")
    else:
        fd = bpf.open_map()
        bpf.map_delete(fd, bpf.attach_key(attach_id))
        os.close(fd)
    inv = lab.exec_shaper("DEL", pod, shaper_conf(pod))
    assert inv.rc == 0, inv.stdout
    assert_clean(lab, veth)
    assert attach_id not in map_ids()


# ---------------------------------------------------------------- CHECK finds drift


def test_check_detects_removed_ifb(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=10_000_000))
    lab.run(lab.node, "ip", "link", "del", att.result["interfaces"][-1]["name"])
    with pytest.raises(PluginFailed) as err:
        att.check()
    assert err.value.error["code"] == 102 and "missing" in err.value.error["msg"]


def test_check_detects_changed_qdisc(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000))
    veth = host_veth(pod)
    lab.run(lab.node, "tc", "qdisc", "change", "dev", veth, "root", "handle", "b0d0:", "tbf",
            "rate", "20mbit", "burst", "125000", "limit", "31250")  # fmt: skip
    with pytest.raises(PluginFailed) as err:
        att.check()
    assert err.value.error["code"] == 102
    assert "rate expected 1250000, actual 2500000" in err.value.error["msg"]


def test_check_detects_detached_program(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=10_000_000))
    lab.run(lab.node, "tc", "filter", "del", "dev", host_veth(pod), "ingress", "pref", str(0xFB0D))  # the redirect
    with pytest.raises(PluginFailed) as err:
        att.check()
    assert f"from-pod filter prio 0xfb0d on {host_veth(pod)}: missing" in err.value.error["msg"]


def test_check_detects_unexpected_shaping(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    att.runtime_config = bandwidth(egress=10_000_000)  # ingress no longer configured
    with pytest.raises(PluginFailed) as err:
        att.check()
    assert "ingress qdisc on" in err.value.error["msg"] and "this direction has no rate" in err.value.error["msg"]


# ---------------------------------------------------------------- ADD rolls back


@pytest.mark.parametrize(
    "point",
    ["after-ingress", "after-ifb-create", "after-ifb", "after-map", "after-clsact", "after-tcx", "after-filter"],
)
def test_add_failure_rolls_back(lab: Lab, point: str) -> None:
    if point == "after-tcx" and lab.use_agent:
        pytest.skip("through the agent, ADD attaches no TCX link: test_handover.py fails the handover there")
    pod = lab.pod("a")
    before = map_ids()
    lab.set_fault(point)
    with pytest.raises(PluginFailed) as err:
        lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    lab.set_fault(None)
    assert err.value.plugin == "bwplugin" and err.value.error["code"] == 5
    assert f"injected fault at {point}" in err.value.error["msg"]
    kv = view(lab.node)
    assert kv.ifbs() == []
    for name, link in kv.links.items():
        if link["kind"] == "veth":
            assert kv.tbf(name) is None and not kv.has_clsact(name)
    assert map_ids() == before


def test_foreign_device_with_our_ifb_name_fails_cleanly(lab: Lab) -> None:
    pod = lab.pod("a")
    name = ifb_name("bwpt-net", f"{pod.name}-cid", "eth0")
    lab.run(lab.node, "ip", "link", "add", name, "type", "bridge")
    with pytest.raises(PluginFailed) as err:
        lab.attach(pod, lab.conflist(shaper()), bandwidth(ingress=10_000_000, egress=10_000_000))
    assert err.value.error["code"] == 101 and name in err.value.error["msg"]
    kv = view(lab.node)
    assert kv.links[name]["kind"] == "bridge"  # untouched
    veths = [n for n, link in kv.links.items() if link["kind"] == "veth"]
    assert veths and all(kv.tbf(v) is None for v in veths)  # the ingress TBF was rolled back


def test_foreign_qdisc_is_never_replaced(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))  # ptp only
    veth = host_veth(pod)
    lab.run(lab.node, "tc", "qdisc", "add", "dev", veth, "root", "handle", "1:", "htb")
    conf = plugin_conf(att.conflist, shaper(), att.result, bandwidth(ingress=10_000_000, egress=10_000_000))
    inv = lab.exec_shaper("ADD", pod, conf)
    err = json.loads(inv.stdout)
    assert inv.rc == 1 and err["code"] == 101 and "htb" in err["msg"]
    kv = view(lab.node)
    assert [q["kind"] for q in kv.qdiscs[veth] if q["parent"] == 0xFFFFFFFF] == ["htb"]
    assert kv.ifbs() == []


# ---------------------------------------------------------------- bad input


def test_not_a_veth(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))
    lab.run(pod.netns, "ip", "link", "add", "eth9", "type", "ifb")  # this kernel has no dummy
    conf = plugin_conf(att.conflist, shaper(), att.result, bandwidth(egress=10_000_000))
    inv = lab.exec_shaper("ADD", pod, conf, ifname="eth9")
    err = json.loads(inv.stdout)
    assert inv.rc == 1 and err["code"] == 100 and "not a veth" in err["msg"] and "'eth9'" in err["msg"]
    assert view(lab.node).ifbs() == []


def test_missing_netns_and_interface(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))
    conf = plugin_conf(att.conflist, shaper(), att.result, bandwidth(egress=10_000_000))
    inv = lab.runtime.exec("bwplugin", "ADD", conf, container_id="c", netns="/run/netns/bwpt-none", ifname="eth0")
    err = json.loads(inv.stdout)
    assert err["code"] == 4 and "CNI_NETNS='/run/netns/bwpt-none'" in err["msg"]
    inv = lab.exec_shaper("ADD", pod, conf, ifname="eth7")
    err = json.loads(inv.stdout)
    assert err["code"] == 100 and "'eth7' not found" in err["msg"]


def test_bad_config_through_the_executable(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))
    good = plugin_conf(att.conflist, shaper(), att.result, None)
    cases = [
        (b"{", 6, "decode"),
        (json.dumps({**good, "cniVersion": "0.2.0"}).encode(), 1, "0.2.0"),
        (json.dumps({**good, "ingressRate": 10**6}).encode(), 7, "ingressRate=1000000 is set but ingressBurst"),
        (json.dumps({**good, "egressRate": "fast", "egressBurst": 1}).encode(), 7, "egressRate must be"),
        (
            json.dumps(
                {k: v for k, v in good.items() if k != "prevResult"} | {"egressRate": 10**6, "egressBurst": 10**5}
            ).encode(),
            7,
            "prevResult is required",
        ),
    ]
    for stdin, code, needle in cases:
        inv = lab.exec_shaper("ADD", pod, stdin)
        err = json.loads(inv.stdout)
        assert (inv.rc, err["code"]) == (1, code) and needle in err["msg"], err
    assert view(lab.node).ifbs() == []


# ---------------------------------------------------------------- GC, STATUS, VERSION


def test_gc_removes_only_stale_attachments_of_this_network(lab: Lab) -> None:
    conflist = lab.conflist(shaper(), "1.1.0")
    a, b = lab.pod("a"), lab.pod("b")
    lab.attach(a, conflist, bandwidth(ingress=10_000_000, egress=10_000_000))
    lab.attach(b, conflist, bandwidth(ingress=10_000_000, egress=10_000_000))
    b_id, b_veth = attach_id_of(lab, b), host_veth(b)
    for veth in (host_veth(a), b_veth):
        after_handover(lab.node, veth, through_agent=lab.agent is not None)
    gc_conf = {"cniVersion": "1.1.0", "name": "bwpt-net", "type": "bwplugin"}
    other = {**gc_conf, "name": "another-net", "cni.dev/valid-attachments": []}
    assert lab.runtime.exec("bwplugin", "GC", other).rc == 0
    assert len(view(lab.node).ifbs()) == 2  # other network: untouched
    valid = [{"containerID": a.attachment.container_id, "ifname": "eth0"}]
    inv = lab.runtime.exec("bwplugin", "GC", {**gc_conf, "cni.dev/valid-attachments": valid})
    assert (inv.rc, inv.stdout) == (0, "")
    kv = view(lab.node)
    assert kv.ifbs() == [a.attachment.result["interfaces"][-1]["name"]]
    assert kv.tbf(b_veth) is None and not kv.has_clsact(b_veth)
    assert b_id not in map_ids()
    assert len(link_pins()) == (2 if TCX else 0)  # a's links only
    if TCX:
        assert tcx_chain(lab.node, b_veth, "ingress") == tcx_chain(lab.node, b_veth, "egress") == []
    a.attachment.check()


def test_status_and_version(lab: Lab) -> None:
    inv = lab.runtime.exec("bwplugin", "STATUS", {"cniVersion": "1.1.0", "name": "n", "type": "bwplugin"})
    assert (inv.rc, inv.stdout) == (0, "")
    inv = lab.runtime.exec("bwplugin", "VERSION", {"cniVersion": "1.0.0"})
    assert inv.rc == 0 and json.loads(inv.stdout)["supportedVersions"][-1] == "1.1.0"


# ---------------------------------------------------------------- traffic


def test_traffic_is_shaped_both_directions(lab: Lab) -> None:
    """UDP sent at 1.5x the rate keeps the shaper backlogged: the wire rate must be the
    configured rate. TCP must hold it too: within 5 % on the wire and in goodput
    (measured 0.964-1.019 over 13 runs), and never 2 % above it on the wire. A TCP
    shortfall is measured once more: 1 in 12 fresh 3 s flows at 10 Mbit/s reads
    0.92 (an early retransmission timeout under tail drop; the same before and after
    the TCX handover), and a shaper holding a wrong rate fails both runs."""
    conflist = lab.conflist(shaper())
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    rates = {"ingress": 20_000_000, "egress": 10_000_000}
    att = lab.attach(pod, conflist, bandwidth(ingress=rates["ingress"], egress=rates["egress"]))
    lab.iperf_server(peer)
    devices = {"ingress": host_veth(pod), "egress": att.result["interfaces"][-1]["name"]}
    for direction, dev in devices.items():
        rate = rates[direction]
        with Sampler(lab.node, [dev]) as s:
            lab.iperf(pod, peer, seconds=3, reverse=direction == "ingress", udp_rate=rate * 3 // 2)
        assert abs(s.steady_rate(dev) / rate - 1) < 0.02, (direction, "udp", s.steady_rate(dev))
        for attempt in (1, 2):
            with Sampler(lab.node, [dev]) as s:
                result = lab.iperf(pod, peer, seconds=3, reverse=direction == "ingress")
            wire = s.steady_rate(dev) / rate
            goodput = iperf_goodput(result) / (rate * TCP_GOODPUT_CEILING)
            assert wire < 1.02, (direction, "tcp wire", wire)  # an excess is never measured again
            if wire > 0.95 and goodput > 0.95:
                break
            print(f"{direction}: TCP attempt {attempt} fell short (wire {wire:.3f}, goodput {goodput:.3f})")
        assert 0.95 < wire < 1.02, (direction, "tcp wire", wire)
        assert 0.95 < goodput < 1.04, (direction, "tcp goodput / ceiling", goodput)


def test_a_jumbo_mtu_pod_passes_full_frames_and_is_shaped_both_ways(lab: Lab) -> None:
    """ptp with MTU 9000: TBF never sends a packet bigger than its bucket, so the
    buckets and the ifb must take a full jumbo frame (pinged with DF set), and the
    rate holds with jumbo datagrams, as the receiver counts them."""
    rate = 50_000_000
    conflist = lab.conflist(shaper(), mtu=9000)
    peer, pod = lab.pod("peer"), lab.pod("jumbo")
    lab.attach(peer, conflist)
    att = lab.attach(pod, conflist, bandwidth(ingress=rate, egress=rate))
    veth, ifb = host_veth(pod), att.result["interfaces"][-1]["name"]
    links = {x["ifname"]: x for x in json.loads(lab.run(lab.node, "ip", "-j", "link", "show").stdout)}
    assert links[veth]["mtu"] == 9000 and links[ifb]["mtu"] >= 9000, (links[veth]["mtu"], links[ifb]["mtu"])
    for dev in (veth, ifb):
        (tbf,) = [q for q in json.loads(lab.run(lab.node, "tc", "-j", "qdisc", "show", "dev", dev).stdout)
                  if q["kind"] == "tbf"]  # fmt: skip
        assert tbf["options"]["burst"] >= 9014, (dev, tbf)  # one whole frame fits the bucket
    lab.run(pod.netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", "8972", peer.ip)
    lab.run(peer.netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", "8972", pod.ip)
    lab.iperf_server(peer)
    ceiling = 8000 / (8000 + 8 + 20 + 14)  # one 8000-byte datagram per jumbo frame
    for reverse in (False, True):
        result = lab.iperf(pod, peer, seconds=3, reverse=reverse, udp_rate=rate * 3 // 2, udp_length=8000)
        goodput = iperf_goodput(result) / (rate * ceiling)
        assert abs(goodput - 1) < 0.03, ("ingress" if reverse else "egress", goodput)


def entry_container_id(map_name: str, attach_id: int) -> str:
    """The container ID in an attach map entry, looked up by bpftool (struct bwp_val:
    the ID's 128 bytes start at offset 112)."""
    path = os.path.join(os.environ["BWPLUGIN_PIN_DIR"], map_name)
    key = [str(b) for b in attach_id.to_bytes(4, "little")]
    out = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", path, "key", *key],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    value = bytes(int(b, 16) for b in json.loads(out)["value"])
    return value[112:240].split(b"\0", 1)[0].decode()


def test_the_attachment_limit_is_a_clear_error_and_a_freed_id_is_found(lab: Lab) -> None:
    """A node shapes at most 65,535 attachments (skb->tc_classid is 16 bits). With
    every id taken, ADD answers code 11 and leaves nothing; one id freed, the next
    ADD gets exactly that one. The map is filled here with placeholder entries."""
    conflist = lab.conflist(shaper())
    first = lab.pod("first")
    lab.attach(first, conflist, bandwidth(egress=10_000_000))
    name = f"attach_v{bpf.MAP_LAYOUT}"
    taken = pinned_ids(name)
    fd = bpf.open_map()
    assert fd is not None
    filler = bpf.AttachEntry(0, 0, 0, 0, 0, "bwpt0", f"bwpt-{lab.tag}-filler").pack()
    free = [i for i in range(1, bpf.MAX_ATTACH + 1) if i not in taken]
    try:
        for i in free:
            bpf.map_update(fd, bpf.attach_key(i), filler, 1)  # BPF_NOEXIST: never over a real entry
        assert len(pinned_ids(name)) == bpf.MAX_ATTACH
        full = lab.pod("full")
        with pytest.raises(PluginFailed) as err:
            lab.attach(full, conflist, bandwidth(ingress=10_000_000, egress=10_000_000))
        assert err.value.plugin == "bwplugin" and err.value.error, err.value
        assert err.value.error["code"] == 11 and "all 65535 attachment ids" in err.value.error["msg"], err.value
        kv = view(lab.node)
        firsts = {host_veth(first), first.attachment.result["interfaces"][-1]["name"]}
        assert kv.ifbs() == [first.attachment.result["interfaces"][-1]["name"]]
        assert not [d for d, qs in kv.qdiscs.items() if d not in firsts and any(
            q["kind"] in ("tbf", "clsact", "htb") for q in qs)], kv.qdiscs  # fmt: skip
        lab.remove_pod(full)

        freed = free[len(free) // 2]
        bpf.map_delete(fd, bpf.attach_key(freed))
        again = lab.pod("again")
        att = lab.attach(again, conflist, bandwidth(ingress=10_000_000))
        assert entry_container_id(name, freed) == att.container_id
        att.check()
    finally:
        for i in free:
            raw = bpf.map_lookup(fd, bpf.attach_key(i), bpf.VAL.size)
            if raw is not None and bpf.AttachEntry.unpack(raw).container_id == f"bwpt-{lab.tag}-filler":
                bpf.map_delete(fd, bpf.attach_key(i))
        os.close(fd)


def test_unshaped_pod_is_not_limited(lab: Lab) -> None:
    conflist = lab.conflist(shaper())
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    lab.attach(pod, conflist, bandwidth(ingress=10_000_000))
    lab.iperf_server(peer)
    egress = iperf_goodput(lab.iperf(pod, peer, seconds=2))
    assert egress > 100_000_000  # only ingress is shaped: egress runs at veth speed


def test_ifb_name_and_alias_follow_the_documented_scheme(lab: Lab) -> None:
    """docs/design.md's naming, worked out with coreutils' sha256sum rather than
    bwplugin's own functions: "bwpl" + the first 11 hex digits of
    sha256(network NUL container-ID NUL ifname), and an alias recording the
    network's tag, the attachment id, the host veth's ifindex, ifname and ID."""
    pod = lab.pod("named")
    att = lab.attach(pod, lab.conflist(shaper(), name="bwpt-named-net"), bandwidth(egress=10_000_000))

    def sha256(data: bytes) -> str:
        return subprocess.run(["sha256sum"], input=data, capture_output=True, check=True).stdout.split()[0].decode()

    cid = att.container_id
    expected = "bwpl" + sha256(f"bwpt-named-net\0{cid}\0eth0".encode())[:11]
    kv = view(lab.node)
    assert kv.ifbs() == [expected] and att.result["interfaces"][-1]["name"] == expected
    (attach_id,) = pinned_ids(f"attach_v{bpf.MAP_LAYOUT}")
    veth_index = kv.links[host_veth(pod)]["index"]
    tag = sha256(b"bwpt-named-net")[:12]
    assert kv.links[expected]["alias"] == f"bwplugin net={tag} id={attach_id} host={veth_index} if=eth0 cid={cid}"
