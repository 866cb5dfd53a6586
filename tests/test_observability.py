"""`bwplugin stats` and multiple attachments per container, on real pods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bench.lab.lab import Lab
from bench.lab.libcni import plugin_conf
from bwplugin.datapath import bpf

from .conftest import bandwidth, host_veth, shaper
from .oracle import settled_ifbs, view
from .test_pure_layouts import samples

pytestmark = pytest.mark.kernel
RATE = 10_000_000


def stats(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed executable's subcommand, run on the (lab's) node."""
    env = {**os.environ, "BWPLUGIN_PIN_DIR": os.environ["BWPLUGIN_PIN_DIR"]}
    return subprocess.run(
        ["nsenter", f"--net={lab.node}", str(lab.bin_dir / "bwplugin"), "stats", *args],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip


def rows_of(lab: Lab, container_id: str) -> list[dict]:
    return [r for r in json.loads(stats(lab, "--json").stdout) if r["container_id"] == container_id]


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_offered_equals_sent_for_tcp_gso_to_the_byte(lab: Lab, direction: str) -> None:
    """TCP crosses the veth as GSO packets, which the qdiscs count as their segments,
    and their bytes with each segment's headers. The eBPF counters count the same,
    so with nothing dropped (a 32 KB window never fills a 250 KB queue) offered
    equals sent exactly, in packets and in bytes. (When the queue drops, the qdisc
    counts drops per packet, GSO or not, so only bounds hold; see the UDP test.)"""
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, lab.conflist(shaper()))
    att = lab.attach(pod, lab.conflist(shaper(latencyMs=200)), bandwidth(ingress=RATE, egress=RATE))
    # the sender's host-side veth counts what it receives per skb: a GSO packet once
    sender = host_veth(pod, att.result) if direction == "egress" else host_veth(peer)

    def skbs_in() -> int:
        out = lab.run(lab.node, "ip", "-s", "-j", "link", "show", "dev", sender).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["packets"])

    before = skbs_in()
    lab.iperf_server(peer)
    lab.iperf(pod, peer, seconds=2, omit=0, reverse=direction == "ingress", extra=("-w", "32K"))
    time.sleep(0.5)  # the queue drains
    skbs = skbs_in() - before
    (row,) = rows_of(lab, att.container_id)
    d, q = row[direction], row[direction]["queue"]
    assert d["shaped_packets"] > 1.3 * skbs  # GSO did happen: more segments than skbs
    assert (q["drops"], q["backlog_packets"]) == (0, 0), q
    assert (d["shaped_packets"], d["shaped_bytes"]) == (q["sent_packets"], q["sent_bytes"]), (d, q)


def test_the_ifb_sends_nothing_of_its_own(lab: Lab) -> None:
    """What the egress qdisc counts is what the pod offered, even with the pod idle.
    An ifb with IPv6 gets a link-local address and sends its own MLD reports and
    router solicitations through that qdisc: budget, and counts, nobody offered."""
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(shaper()), bandwidth(egress=RATE))
    ifb = att.result["interfaces"][-1]["name"]
    time.sleep(2.5)  # past the router-solicitation delay (1 s) and MLD's unsolicited reports (1 s)
    addrs = json.loads(lab.run(lab.node, "ip", "-j", "-6", "addr", "show", "dev", ifb).stdout)
    assert [a for link in addrs for a in link.get("addr_info", [])] == []
    (row,) = rows_of(lab, att.container_id)
    eg, q = row["egress"], row["egress"]["queue"]
    # the pod's own eth0 may have sent IPv6 control frames: those were offered
    assert eg["shaped_packets"] == q["sent_packets"] + q["drops"] + q["backlog_packets"], (eg, q)
    assert eg["shaped_bytes"] == q["sent_bytes"], (eg, q)


def test_stats_table_json_and_prometheus(lab: Lab, tmp_path: Path) -> None:
    conflist = lab.conflist(shaper())
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    att = lab.attach(pod, conflist, bandwidth(ingress=2 * RATE, egress=RATE))
    lab.iperf_server(peer)
    lab.iperf(pod, peer, seconds=2, udp_rate=RATE * 2)  # twice the rate: the qdisc must drop
    (row,) = rows_of(lab, att.container_id)
    veth, ifb = host_veth(pod, att.result), att.result["interfaces"][-1]["name"]
    assert (row["ifname"], row["host_veth"], row["ifb"], row["problems"]) == ("eth0", veth, ifb, [])
    eg, ing = row["egress"], row["ingress"]
    assert eg["queue"]["rate_bps"] == RATE and ing["queue"]["rate_bps"] == 2 * RATE
    # offered (counted by eBPF before the qdisc) = sent + dropped, roughly half dropped
    assert eg["shaped_bytes"] > eg["queue"]["sent_bytes"] > 0 and eg["queue"]["drops"] > 0
    assert 0.4 < eg["queue"]["sent_bytes"] / eg["shaped_bytes"] < 0.65
    q = eg["queue"]  # UDP: no GSO, one packet per datagram, so drops count alike
    assert eg["shaped_packets"] == q["sent_packets"] + q["drops"] + q["backlog_packets"]
    assert eg["unshaped_bytes"] == 0 and ing["shaped_bytes"] > 0  # acks and iperf's control flow

    table = stats(lab).stdout.splitlines()
    assert table[0].split()[:3] == ["NAMESPACE/POD", "CONTAINER", "IF"]
    # the lab sends CNI_ARGS as containerd does (K8S_POD_NAMESPACE=bwpt, K8S_POD_NAME=the pod)
    named = [f"bwpt/{pod.name}", att.container_id[:13]]
    assert any(line.split()[:2] == named and veth in line and ifb in line for line in table[1:]), table

    prom = tmp_path / "bwplugin.prom"
    stats(lab, "--prometheus", str(prom))
    text = prom.read_text()
    assert "# TYPE bwplugin_offered_bytes_total counter" in text
    got = samples(text)
    base = {"namespace": "bwpt", "pod": pod.name, "container_id": att.container_id, "ifname": "eth0", "host_veth": veth}
    shaped_egress = frozenset({**base, "direction": "egress", "class": "shaped"}.items())
    assert got[("bwplugin_offered_bytes_total", shaped_egress)] == eg["shaped_bytes"]
    assert got[("bwplugin_rate_bytes_per_second", frozenset({**base, "direction": "egress"}.items()))] == RATE // 8
    assert [f.name for f in tmp_path.iterdir()] == ["bwplugin.prom"]  # written via a rename

    att.delete()
    pod.attachment = None
    assert rows_of(lab, att.container_id) == []  # entries vanish on DEL


def test_counters_survive_a_plugin_upgrade(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new build (changed C source, same map layout) compiles and pins new
    programs; attachments made before keep running theirs on the same map, so
    their counters continue, and CHECK still accepts them."""
    conflist = lab.conflist(shaper())
    peer, old = lab.pod("peer"), lab.pod("old")
    lab.attach(peer, conflist)
    att = lab.attach(old, conflist, bandwidth(egress=RATE))
    lab.iperf_server(peer)
    lab.iperf(old, peer, seconds=1, omit=0, udp_rate=RATE)
    (before,) = rows_of(lab, att.container_id)

    src = tmp_path / "bpf"
    shutil.copytree(bpf.source_path().parent, src)
    with open(src / "bwplugin.c", "a") as fh:
        fh.write("// a newer build\n")
    # the new build: the plugin process's setting, or the restarted agent's own
    lab.runtime.extra_env["BWPLUGIN_BPF_DIR"] = str(src)
    if lab.use_agent:
        monkeypatch.setenv("BWPLUGIN_BPF_DIR", str(src))
        lab.stop_agent()
        lab.start_agent()
    new = lab.pod("new")
    lab.attach(new, conflist, bandwidth(egress=RATE))
    new_ver = [p.name for p in Path(os.environ["BWPLUGIN_PIN_DIR"]).iterdir() if p.name.startswith("bwp_from_pod_")]
    assert len(new_ver) == 2  # bwp_from_pod_<v> and bwp_from_pod_mirred_<v>, of the new build only
    old_filter = view(lab.node).filters[host_veth(old, att.result)][0]["name"]
    assert not any(old_filter.endswith(v.rsplit("_", 1)[1]) for v in new_ver)

    lab.iperf(old, peer, seconds=1, omit=0, udp_rate=RATE)
    (after,) = rows_of(lab, att.container_id)
    assert after["egress"]["shaped_bytes"] > before["egress"]["shaped_bytes"] + RATE // 8 // 2
    att.check()
    new.attachment.check()
    del lab.runtime.extra_env["BWPLUGIN_BPF_DIR"]


def test_multiple_attachments_per_container(lab: Lab) -> None:
    """eth0 on one network, eth1 on another and eth2 on the first network's name
    again (its own subnet: ptp cannot put two interfaces behind one gateway):
    three ifbs, three veths, three rates; removing one leaves the others shaped."""
    net_a = lab.conflist(shaper(), name="bwpt-a")
    net_b = lab.conflist(shaper(), name="bwpt-b", subnet="10.234.2.0/24")
    net_a2 = lab.conflist(shaper(), name="bwpt-a", subnet="10.234.3.0/24")
    for extra in (net_b, net_a2):  # only eth0 gets the default route
        extra["plugins"][0]["ipam"]["routes"] = []
    pod = lab.pod("multi")
    cid = f"{pod.name}-cid"
    atts = {}
    for ifname, conflist, rate in (("eth0", net_a, RATE), ("eth1", net_b, 2 * RATE), ("eth2", net_a2, 3 * RATE)):
        atts[ifname] = lab.attach(pod, conflist, bandwidth(ingress=rate, egress=rate), ifname=ifname, container_id=cid)
    kv = view(lab.node)
    ifbs = {name: a.result["interfaces"][-1]["name"] for name, a in atts.items()}
    assert len(set(ifbs.values())) == 3
    for (ifname, att), rate in zip(atts.items(), (RATE, 2 * RATE, 3 * RATE), strict=True):
        assert kv.tbf(ifbs[ifname])["rate"] == rate // 8
        assert kv.tbf(host_veth(pod, att.result))["rate"] == rate // 8
        att.check()
    rows = {r["ifname"]: r for r in rows_of(lab, cid)}
    assert {k: r["egress"]["queue"]["rate_bps"] for k, r in rows.items()} == {
        "eth0": RATE,
        "eth1": 2 * RATE,
        "eth2": 3 * RATE,
    }

    eth1 = atts.pop("eth1")
    plugin = eth1.conflist["plugins"][-1]
    inv = lab.runtime.exec(
        "bwplugin", "DEL", plugin_conf(eth1.conflist, plugin, eth1.result, eth1.runtime_config),
        container_id=cid, netns=pod.netns, ifname="eth1",
    )  # fmt: skip
    assert (inv.rc, inv.stdout) == (0, "")
    assert sorted(settled_ifbs(lab.node)) == sorted([ifbs["eth0"], ifbs["eth2"]])
    for att in atts.values():
        att.check()
    assert sorted(r["ifname"] for r in rows_of(lab, cid)) == ["eth0", "eth2"]
    for att in atts.values():
        att.delete()
    eth1.delete()  # ptp's part
    pod.attachment = None
    assert settled_ifbs(lab.node) == [] and rows_of(lab, cid) == []
