"""The plugin process SIGKILLed at each step of ADD (no rollback can run): the
runtime's DEL must clean everything, and a retried ADD must complete."""

from __future__ import annotations

import pytest

from bench.lab.lab import Lab
from bench.lab.libcni import PluginFailed

from .conftest import bandwidth, shaper
from .oracle import attach_count, link_pins, settled_ifbs, view

pytestmark = pytest.mark.kernel
POINTS = ["after-ingress", "after-ifb-create", "after-ifb", "after-map", "after-clsact", "after-tcx", "after-filter"]


@pytest.mark.parametrize("point", POINTS)
def test_add_killed_then_del_cleans_and_retry_completes(point: str) -> None:
    with Lab() as lab:  # in-process: the plugin process itself dies
        pod = lab.pod("a")
        conflist = lab.conflist(shaper())
        rc = bandwidth(ingress=10_000_000, egress=10_000_000)
        lab.set_fault(f"{point}:kill")
        with pytest.raises(PluginFailed) as err:
            lab.attach(pod, conflist, rc)
        lab.set_fault(None)
        assert err.value.rc == -9 and err.value.plugin == "bwplugin"
        pod.attachment.delete()  # what the runtime does after a failed ADD
        assert settled_ifbs(lab.node) == []
        kv = view(lab.node)
        assert not any(kv.has_clsact(n) or kv.tbf(n) for n in kv.links)
        assert (link_pins(), attach_count()) == ([], 0)  # no TCX link, map entry or claim
        att = lab.attach(pod, conflist, rc)  # the retry
        att.check()
