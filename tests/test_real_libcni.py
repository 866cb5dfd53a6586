"""The lab's chains run through the real libcni (bench/lab/cnidriver on Debian's
libcni 1.1.2), not an emulation of it. These tests check what that changes, read
from what libcni itself wrote or sent: its result cache, the result it returns,
and which plugins it ran."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bench.lab import lab as lab_module
from bench.lab.lab import Lab
from bench.lab.libcni import PluginFailed

from .conftest import REQUIRE, bandwidth, host_veth, shaper
from .oracle import view

pytestmark = pytest.mark.kernel
M = 1_000_000

# a third plugin that passes prevResult on at ADD and fails DEL while its switch file exists
FAILING_DEL = """#!/usr/bin/python3
import json, os, sys
conf = json.load(sys.stdin)
if os.environ["CNI_COMMAND"] == "DEL" and os.path.exists({switch!r}):
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 11, "msg": "bwpt-fail: DEL refused"}}))
    sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


@pytest.fixture
def lab() -> object:
    if lab_module.DRIVER is None:
        assert not REQUIRE, "CI runs the lab through the real libcni"
        pytest.skip("no Go toolchain and libcni source: the lab emulates libcni")
    with Lab() as the_lab:
        yield the_lab


def test_libcni_forces_the_lists_version_and_caches_what_it_sent(lab: Lab) -> None:
    pod = lab.pod("ver")
    conflist = lab.conflist({**shaper(), "cniVersion": "0.4.0"})  # a plugin's own version loses
    att = lab.attach(pod, conflist, bandwidth(ingress=10 * M, egress=20 * M))
    assert att.real
    assert att.result is not None and att.result["cniVersion"] == "1.0.0"

    cache = Path(lab.runtime.cache_dir) / "results" / f"bwpt-net-{att.container_id}-eth0"
    cached = json.loads(cache.read_text())
    assert cached["kind"] == "cniCacheV1"
    assert cached["capabilityArgs"] == {"bandwidth": {"ingressRate": 10 * M, "ingressBurst": 4294967295,
                                                      "egressRate": 20 * M, "egressBurst": 4294967295}}  # fmt: skip
    assert ["K8S_POD_NAME", pod.name] in cached["cniArgs"]
    assert cached["result"]["interfaces"] == att.result["interfaces"]

    att.check()  # libcni sends CHECK the cached result, converted to the list's version
    att.delete()
    assert not cache.exists()  # libcni drops the cache after a whole DEL
    pod.attachment = None


def test_libcni_stops_del_at_the_first_failing_plugin_and_a_retry_cleans(lab: Lab) -> None:
    switch = lab.tmp / "del-fails"
    script = lab.bin_dir / "bwpt-fail"
    script.write_text(FAILING_DEL.format(switch=str(switch)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    pod = lab.pod("delstop")
    conflist = lab.conflist(shaper())
    conflist["plugins"].append({"type": "bwpt-fail"})
    att = lab.attach(pod, conflist, bandwidth(ingress=10 * M, egress=10 * M))
    veth = host_veth(pod)
    ifbs = view(lab.node).ifbs()
    assert len(ifbs) == 1

    switch.touch()
    with pytest.raises(PluginFailed) as err:
        att.delete()
    assert err.value.plugin == "bwpt-fail" and err.value.error and err.value.error["code"] == 11, err.value
    # libcni ran neither bwplugin's DEL nor ptp's: everything is still in place
    assert "bwplugin:DEL" not in att.logs and "ptp:DEL" not in att.logs
    kv = view(lab.node)
    assert veth in kv.links and kv.ifbs() == ifbs and kv.tbf(veth) is not None

    os.unlink(switch)
    att.delete()  # the runtime's retry: the whole chain's DEL, with the cached result
    kv = view(lab.node)
    assert kv.ifbs() == [] and veth not in kv.links
    pod.attachment = None
