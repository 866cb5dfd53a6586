"""Fixtures for kernel tests. They need root; in CI (BWPLUGIN_REQUIRE_KERNEL=1,
set by scripts/test.sh when running as root) a missing capability is a failure,
never a silent skip."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from bench.lab import lab as lab_module
from bench.lab.lab import Lab, remove_pin_dir
from bench.lab.lab import runtime_bandwidth as bandwidth  # noqa: F401 (re-exported to tests)
from bench.lab.libcni import build_driver

from . import leaks

REQUIRE = os.environ.get("BWPLUGIN_REQUIRE_KERNEL") == "1"
# every plugin process and agent the lab starts gets the tests' fault hooks
lab_module.PRELUDE = "import tests.faults; tests.faults.install()"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if REQUIRE:
        raise pytest.UsageError("BWPLUGIN_REQUIRE_KERNEL=1 but not running as root")
    skip = pytest.mark.skip(reason="needs root for network namespaces, tc and bpf")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


PIN_LEFTOVERS: list[str] = []  # what private_pins found in the session's maps before removing them


@pytest.fixture(scope="session", autouse=True)
def no_leaks_at_session_end() -> Iterator[None]:
    """Defined first, so it is set up first and torn down last: after every other
    fixture, every lab and every runtime is gone, nothing the session made may be
    left (netns, links, qdiscs, processes, mounts, dirs, pins, map entries, libcni
    cache), as tools independent of bwplugin count it."""
    if os.geteuid() != 0:
        yield
        return
    before = leaks.take(None)
    yield
    left = leaks.take(None).new_since(before) + PIN_LEFTOVERS
    assert not left, "the test session left these behind:\n  " + "\n  ".join(left)


@pytest.fixture(scope="session", autouse=True)
def private_pins() -> Iterator[None]:
    """One private bpffs pin directory for the session: the program compiles once,
    and nothing is left in the node's real /sys/fs/bpf/bwplugin."""
    if os.geteuid() != 0:
        yield
        return
    path = f"/sys/fs/bpf/bwpt-test-{os.getpid()}"
    os.environ["BWPLUGIN_PIN_DIR"] = path
    # the node lock and the redirect-probe cache, never the node's /run/bwplugin
    os.environ["BWPLUGIN_RUN_DIR"] = tempfile.mkdtemp(prefix="bwpt-run-")
    try:
        yield
    finally:
        PIN_LEFTOVERS.extend(i for i in leaks.take(path).items if i.startswith(("pinned link", "map ")))
        remove_pin_dir(os.environ.pop("BWPLUGIN_PIN_DIR"))
        shutil.rmtree(os.environ.pop("BWPLUGIN_RUN_DIR"), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def real_libcni() -> Iterator[None]:
    """The lab's chains run through the real libcni (bench/lab/cnidriver, on Debian's
    golang-github-appc-cni-dev), built once per session; without Go they would fall
    back to the emulation, which CI does not allow."""
    if os.geteuid() != 0:
        yield
        return
    out = tempfile.mkdtemp(prefix="bwpt-cnidriver-")
    try:
        try:
            lab_module.DRIVER = build_driver(out)
        except (OSError, RuntimeError) as exc:
            if REQUIRE:
                raise
            print(f"the real libcni is not available ({exc}): the lab emulates it")
        yield
    finally:
        lab_module.DRIVER = None
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(params=["in-process", "agent"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """Every kernel test runs through both paths: the executable doing the work
    itself, and the executable forwarding to a node agent."""
    with Lab(agent=request.param == "agent") as the_lab:
        yield the_lab


def shaper(**static: Any) -> dict[str, Any]:
    return {"type": "bwplugin", "capabilities": {"bandwidth": True}, **static}


def host_veth(pod: Any, result: dict[str, Any] | None = None) -> str:
    """The pod's host-side veth, from its CNI result (or the given one)."""
    ifaces = (result or pod.attachment.result)["interfaces"]
    return next(i["name"] for i in ifaces if not i.get("sandbox") and not i["name"].startswith("bwpl"))
