"""A regular wheel works: built from this checkout, installed (not editable) into a
fresh venv, its bwplugin-install puts an executable into a private containerd's
CNI bin dir, and that executable shapes a pod (ADD), passes CHECK and cleans up
(DEL), compiling the eBPF C source that ships inside the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lab.containerd import Containerd

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("bwpt-wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp.glob("bwplugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bwplugin/ebpf/bwplugin.c" in names  # the C source is package data
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    venv = tmp / "venv"
    # as on a node: Debian's python3 with its bcc (python3-bpfcc) visible
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True)
    yield venv


def test_a_wheel_installed_plugin_adds_checks_and_deletes_under_containerd(wheel_venv: Path) -> None:
    lib = wheel_venv.parent / "lib"  # not the default /opt/bwplugin/lib: the test's own

    def wheel_install(bin_dir: Path) -> None:
        cmd = [str(wheel_venv / "bin" / "bwplugin-install"), "--dir", str(bin_dir), "--lib", str(lib)]
        subprocess.run(cmd, check=True)

    with Containerd(installer=wheel_install) as c:
        launcher = (c.dir / "bin" / "bwplugin").read_text()
        assert str(lib) in launcher and str(ROOT) not in launcher  # the root-owned copy, not the checkout
        site = next(wheel_venv.glob("lib/python3*/site-packages/bwplugin"))
        assert (lib / "bwplugin" / "cli.py").read_bytes() == (site / "cli.py").read_bytes()  # copied from the wheel
        assert (lib / "bpf" / "bwplugin.c").read_bytes() == (site / "ebpf" / "bwplugin.c").read_bytes()

        annotations = {"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"}
        pod = c.run_pod("pod-wheel", annotations)
        veth = c.host_veth(pod)
        kinds = [q["kind"] for q in json.loads(c.in_node("tc", "-j", "qdisc", "show", "dev", veth).stdout)]
        assert kinds == ["tbf", "clsact"]
        assert c.ifb_of(veth)

        check = c.cni_check(pod)  # with the inputs containerd cached
        assert check.returncode == 0 and check.stdout == "", (check.stdout, check.stderr)

        c.remove_pod(pod)
        links = {link["ifname"] for link in json.loads(c.in_node("ip", "-j", "link", "show").stdout)}
        assert links == {"lo"}
        pins = sorted(os.listdir(str(c.pins)))
        assert any(p.startswith("bwp_from_pod_") for p in pins), pins  # compiled from the wheel's source
