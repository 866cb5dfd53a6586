"""Kernel variety: the act_mirred fallback for kernels whose ifb ignores
bpf_redirect (before 6.4), forced, and chosen by itself after a probe that saw
no redirect; the probes, held against what the running kernel offers as found
independently (its version, tc(8), its symbols), so that these tests hold on any
kernel; and the clear errors when a kind is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lab.lab import Lab
from bench.lab.libcni import plugin_conf
from bench.lab.measure import UDP_GOODPUT_CEILING, Sampler, iperf_goodput
from bwplugin.cni.errors import KernelFeatureError
from bwplugin.commands.status import status_problems
from bwplugin.datapath import bpf, probe, tc
from bwplugin.datapath.netlink import Netlink

from .conftest import bandwidth, host_veth, shaper
from .oracle import filter_actions, kernel_has_tcx, settled_ifbs, view

pytestmark = pytest.mark.kernel
RATE = 10_000_000


@pytest.fixture
def programs(lab: Lab) -> Iterator[bpf.Programs]:
    progs = bpf.programs()
    yield progs
    progs.close()


def test_forced_mirred_fallback_shapes_checks_and_cleans(lab: Lab) -> None:
    conflist = lab.conflist(shaper(egressRedirect="mirred", tcAttach="tc"))  # a kernel before 6.4 has no TCX
    peer, pod = lab.pod("peer"), lab.pod("a")
    lab.attach(peer, conflist)
    att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
    veth, ifb = host_veth(pod), att.result["interfaces"][-1]["name"]
    kv = view(lab.node)
    count, flt = kv.filters[veth]
    assert count["name"].startswith("bwplugin:bwp_count_from_pod_") and count["flags"] == 1
    assert flt["name"].startswith("bwplugin:bwp_from_pod_mirred_") and not flt["flags"]  # not direct action
    assert filter_actions(lab.node, veth) == ["mirred"]
    with Netlink.in_netns(lab.node) as nl:
        ours = tc.our_filters(nl, kv.links[veth]["index"])[(tc.CLSACT_INGRESS, tc.TAIL_PRIO)]
    assert ours.mirred_ifindex == kv.links[ifb]["index"]
    att.check()
    lab.iperf_server(peer)
    with Sampler(lab.node, [ifb]) as s:
        lab.iperf(pod, peer, seconds=2, udp_rate=RATE * 3 // 2)
    assert abs(s.steady_rate(ifb) / RATE - 1) < 0.02, s.steady_rate(ifb)
    # CHECK notices a filter whose mode does not match the config
    att.conflist["plugins"][-1]["egressRedirect"] = "bpf"
    with pytest.raises(Exception) as err:
        att.check()
    assert "expected bwp_from_pod" in str(err.value)
    att.conflist["plugins"][-1]["egressRedirect"] = "mirred"
    plugin = att.conflist["plugins"][-1]
    inv = lab.exec_shaper("DEL", pod, plugin_conf(att.conflist, plugin, att.result, att.runtime_config))
    assert (inv.rc, inv.stdout) == (0, "")
    assert settled_ifbs(lab.node) == []
    kv = view(lab.node)
    assert not kv.has_clsact(veth) and kv.root(veth)["kind"] == "noqueue"


def test_tcx_probe_agrees_with_the_kernels_symbols(lab: Lab, programs: bpf.Programs) -> None:
    """The TCX probe attaches a real link and sends frames through it; the running
    kernel's symbol table says independently whether it has TCX at all."""
    assert probe.tcx_passes_on(programs) == kernel_has_tcx()
    assert probe.attach_mode(programs, "auto") == ("tcx" if kernel_has_tcx() else "tc")
    assert probe.attach_mode(programs, "tc") == "tc" and probe.attach_mode(programs, "tcx") == "tcx"


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def kinds_iproute2_can_make(kinds: tuple[str, ...]) -> set[str]:
    """Which qdisc kinds the running kernel offers (loading its module if it has
    one), found with tc(8) on a veth in a throwaway netns: not bwplugin's probe."""
    name = f"bwpt-kinds-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run = ["ip", "netns", "exec", name]
        subprocess.run([*run, "ip", "link", "add", "bwpt0", "type", "veth", "peer", "name", "bwpt1"], check=True)
        made = set()
        for kind in kinds:
            tbf = ["root", "tbf", "rate", "1mbit", "burst", "10k", "limit", "10k"]  # tbf has no defaults
            parent = {"clsact": ["clsact"], "tbf": tbf}.get(kind, ["root", kind])
            add = subprocess.run([*run, "tc", "qdisc", "add", "dev", "bwpt0", *parent], capture_output=True)
            if add.returncode == 0:
                made.add(kind)
                subprocess.run([*run, "tc", "qdisc", "del", "dev", "bwpt0", *parent], capture_output=True)
        return made
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_the_probes_see_frames_through_a_carrier_that_comes_up_late(lab: Lab) -> None:
    """CI once saw the redirect probe answer "no" on a kernel that honours the
    redirect (an upgraded agent then expected act_mirred where ADD had used the
    redirect). A veth's qdisc is attached only when the kernel's linkwatch work
    sees its carrier, and frames sent before that are dropped without an error; on
    a busy node that work runs late. Here the peer comes up 0.3 s after the probe
    starts sending: the frames sent meanwhile are lost (the one-shot probe of
    before saw none), and the probe must still count the ones sent after."""

    def run(nl: Netlink) -> tuple[bool, int]:
        nl.create_veth("bwplprobe1", "bwplprobe2")
        src, dst = nl.link(name="bwplprobe1"), nl.link(name="bwplprobe2")
        assert src is not None and dst is not None
        for link in (src, dst):
            nl.silence_ipv6(link.index)
        nl.set_link(src.index, up=True)
        early: list[int] = []

        def peer_up_late() -> None:  # a thread of the probe's thread: in its netns
            time.sleep(0.3)
            with Netlink() as late:
                now = late.link(index=src.index)
                early.append(now.tx_packets if now else -1)
                late.set_link(dst.index, up=True)

        waiter = threading.Thread(target=peer_up_late)
        waiter.start()
        try:
            seen = probe._frames_seen(nl, src.index, probe.PROBE_FRAMES)
        finally:
            waiter.join()
        return seen, early[0]

    seen, sent_before_carrier = probe.in_fresh_netns(run)
    assert sent_before_carrier == 0  # the frames of the first 0.3 s went nowhere
    assert seen


def test_redirect_probe_matches_the_kernel_and_has_a_negative_control(lab: Lab, programs: bpf.Programs) -> None:
    """ifb honours bpf_redirect from Linux 6.4 (commit 59e498a3289f): the probe must
    say so on this kernel, whichever it is, and the automatic choice follow it."""
    honoured = kernel_at_least(6, 4)
    assert probe.redirect_honoured(programs) == honoured
    # the same probe with a program that never redirects must see nothing arrive
    assert not probe.redirect_honoured(programs, program="bwp_to_pod")
    assert bpf.attach_get(programs.map_fd, 0) is None  # the probe's key is gone again
    assert probe.redirect_mode(programs, "auto") == ("bpf" if honoured else "mirred")
    assert probe.redirect_mode(programs, "mirred") == "mirred"


@pytest.fixture
def fresh_run_dir(tmp_path: Path) -> Iterator[None]:
    """A run dir of its own, so that the once-per-boot probes run again (for a lab
    made inside this fixture: it and its agent take the dir from the env)."""
    saved = os.environ["BWPLUGIN_RUN_DIR"]
    os.environ["BWPLUGIN_RUN_DIR"] = str(tmp_path / "run")
    try:
        yield
    finally:
        os.environ["BWPLUGIN_RUN_DIR"] = saved


@pytest.mark.parametrize("path", ["in-process", "agent"])
def test_a_kernel_that_ignores_the_redirect_gets_act_mirred_by_itself(fresh_run_dir: None, path: str) -> None:
    """The automatic fallback, not a forced one: the redirect probe's frames do not
    reach its ifb (tests/faults.py sends them through a program that never
    redirects, as a kernel before 6.4 behaves), and a plain config (egressRedirect
    auto) then shapes through act_mirred, checks and cleans."""
    with Lab(agent=path == "agent") as lab:
        lab.set_fault("redirect-ignored")
        conflist = lab.conflist(shaper(tcAttach="tc"))  # a kernel before 6.4 has no TCX either
        peer, pod = lab.pod("peer"), lab.pod("a")
        lab.attach(peer, conflist)
        att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
        veth = host_veth(pod)
        assert filter_actions(lab.node, veth) == ["mirred"]
        assert view(lab.node).filters[veth][-1]["name"].startswith("bwplugin:bwp_from_pod_mirred_")
        modes = [f.read_text().rsplit(" ", 1)[1] for f in Path(os.environ["BWPLUGIN_RUN_DIR"]).glob("redirect.*")]
        assert modes == ["mirred"]  # what the probe decided, cached for the boot
        att.check()
        lab.iperf_server(peer)
        goodput = iperf_goodput(lab.iperf(pod, peer, seconds=2, udp_rate=RATE * 3 // 2)) / (RATE * UDP_GOODPUT_CEILING)
        assert abs(goodput - 1) < 0.03, goodput
        lab.set_fault(None)
        lab.remove_pod(pod)
        assert settled_ifbs(lab.node) == []


def test_check_holds_to_the_redirect_add_chose_not_to_a_later_probe(fresh_run_dir: None) -> None:
    """Under egressRedirect auto, the attachment records the redirect its ADD chose.
    CHECK holds to that record, not to whatever the probe says later (CI once saw an
    upgraded agent's fresh probe answer "no" and CHECK then fail a healthy pod). The
    probe's cached answer is turned around here, and CHECK still passes."""
    with Lab(agent=False) as lab:
        conflist = lab.conflist(shaper())
        pod = lab.pod("a")
        att = lab.attach(pod, conflist, bandwidth(ingress=RATE, egress=RATE))
        (cache,) = Path(os.environ["BWPLUGIN_RUN_DIR"]).glob("redirect.*")
        key, _, chosen = cache.read_text().rpartition(" ")
        actions = filter_actions(lab.node, host_veth(pod))
        assert actions == (["mirred"] if chosen == "mirred" else []), (chosen, actions)
        cache.write_text(f"{key} {'bpf' if chosen == 'mirred' else 'mirred'}")
        att.check()
        lab.remove_pod(pod)


def test_missing_kinds_are_found_and_reported(lab: Lab, programs: bpf.Programs) -> None:
    """bwplugin's probe against tc(8)'s own attempt, for kinds it needs and kinds it
    does not (fq_codel and netem are missing here, modules on a stock Debian kernel)."""
    kinds = ("tbf", "htb", "clsact", "fq_codel", "netem")
    offered = kinds_iproute2_can_make(kinds)
    assert {"tbf", "htb", "clsact"} <= offered
    modules = {"fq_codel": "sch_fq_codel", "netem": "sch_netem"}
    expected = [f"qdisc {k} ({modules[k]})" for k in kinds if k not in offered]
    assert probe.missing_kinds(kinds, programs) == expected
    assert status_problems() == []
    problems = status_problems(("tbf", "htb", "clsact", "fq_codel"))
    assert problems == ([] if "fq_codel" in offered else ["the kernel lacks qdisc fq_codel (sch_fq_codel)"])
    inv = lab.runtime.exec("bwplugin", "STATUS", {"cniVersion": "1.1.0", "name": "n", "type": "bwplugin"})
    assert (inv.rc, inv.stdout) == (0, "")


def test_creating_a_missing_kind_is_a_clear_error(lab: Lab) -> None:
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))
    veth = host_veth(pod)
    with Netlink.in_netns(lab.node) as nl:
        index = nl.link(name=veth).index
        with pytest.raises(KernelFeatureError) as err:
            tc.add_root_qdisc(nl, index, "bwptnone")  # a kind no kernel has
    assert err.value.code == 105 and "'bwptnone'" in err.value.msg and "sch_bwptnone" in err.value.msg
    out = err.value.to_json("1.1.0")
    assert json.loads(json.dumps(out))["code"] == 105
    assert view(lab.node).root(veth)["kind"] == "noqueue"
    assert att.result is not None


def test_probes_leave_nothing_behind(lab: Lab, programs: bpf.Programs) -> None:
    before_links = set(os.listdir("/sys/class/net"))
    before_ns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    probe.missing_kinds(progs=programs)
    probe.redirect_honoured(programs)
    assert set(os.listdir("/sys/class/net")) == before_links
    assert (set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()) == before_ns


def test_a_compile_lock_held_too_long_is_try_again_later(tmp_path) -> None:
    """A process that finds the node lock held (a compile in progress) waits, but not
    without bound: then it answers code 11 and leaves nothing behind. In-process:
    the settings it needs (a fresh pin dir, a short wait) are the plugin process's;
    an agent takes none from a request, and runs the same code."""
    with Lab() as lab:
        _lock_held(lab, tmp_path)


def _lock_held(lab: Lab, tmp_path: Path) -> None:
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pod = lab.pod("a")
    att = lab.attach(pod, lab.conflist(None))
    env = {"BWPLUGIN_RUN_DIR": str(run_dir), "BWPLUGIN_LOCK_WAIT": "0.5",
           "BWPLUGIN_PIN_DIR": f"/sys/fs/bpf/bwpt-lock-{lab.tag}"}  # fmt: skip
    conf = plugin_conf(att.conflist, shaper(), att.result, bandwidth(egress=RATE))
    with open(run_dir / "bpf.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        inv = lab.exec_shaper("ADD", pod, conf, **env)
    err = json.loads(inv.stdout)
    assert (inv.rc, err["code"]) == (1, 11) and "bpf.lock" in err["msg"], err
    assert view(lab.node).ifbs() == [] and not view(lab.node).has_clsact(host_veth(pod))
    assert not os.path.exists(env["BWPLUGIN_PIN_DIR"])  # nothing compiled or pinned


REPO = Path(__file__).resolve().parent.parent


def status_in_private_mounts(
    setup: str, then: str = "", env: dict[str, str] | None = None, dist_packages: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """STATUS run by the plugin's own interpreter line (-I -S) in a private mount
    namespace, after `setup` (shell) has changed what that namespace sees."""
    paths = json.dumps([str(REPO)] + (["/usr/lib/python3/dist-packages"] if dist_packages else []))
    script = (
        f"{setup}; {sys.executable} -I -S -c 'import sys; sys.path[:0] = {paths}; "
        f"from bwplugin.cli import main; raise SystemExit(main())'; {then}"
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        input=b'{"cniVersion": "1.1.0", "name": "n", "type": "bwplugin"}', capture_output=True,
        env={"CNI_COMMAND": "STATUS", "PATH": os.environ["PATH"], **(env or {})},
    )  # fmt: skip


def test_status_without_bcc_or_kernel_headers_is_not_ready(tmp_path) -> None:
    """A node where nothing is compiled yet, bcc is not importable and the kernel
    headers are missing: STATUS says so (code 50). Run in a private mount
    namespace whose /lib/modules/<release> is an empty directory, by a Python
    without Debian's dist-packages (where bcc lives)."""
    release = os.uname().release
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"BWPLUGIN_PIN_DIR": str(tmp_path / "no-pins"), "BWPLUGIN_RUN_DIR": str(tmp_path / "run")}
    proc = status_in_private_mounts(f"mount --bind {empty} /lib/modules/{release}", env=env, dist_packages=False)
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 50, (err, proc.stderr)
    assert "bcc (python3-bpfcc) is not installed" in err["msg"]
    assert f"kernel headers are missing (/lib/modules/{release}/build)" in err["msg"]
    assert os.path.isdir(f"/lib/modules/{release}/build")  # the real node is untouched


def test_status_probes_once_per_boot_and_changes_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtimes poll STATUS: the kind probe (a throwaway netns) runs once per boot and
    program version, and STATUS never mounts bpffs (in a private mount namespace
    where it is unmounted, it stays unmounted)."""
    monkeypatch.setenv("BWPLUGIN_RUN_DIR", str(tmp_path / "run"))
    calls = []
    real = probe.in_fresh_netns
    monkeypatch.setattr(probe, "in_fresh_netns", lambda fn: calls.append(1) or real(fn))
    for _ in range(3):
        assert status_problems() == []
    assert len(calls) == 1
    assert len(list((tmp_path / "run").glob("kinds.*"))) == 1

    proc = status_in_private_mounts(
        "umount /sys/fs/bpf 2>/dev/null",
        then="mountpoint -q /sys/fs/bpf && echo mounted || echo unmounted",
        env={"BWPLUGIN_RUN_DIR": str(tmp_path / "run2")},
    )
    assert proc.stdout.decode().strip().splitlines()[-1] == "unmounted", (proc.stdout, proc.stderr)


def test_bpf_calls_go_through_libbpf_and_status_says_when_it_is_missing(tmp_path) -> None:
    """Portability (arm64 as well as x86_64): no bpf(2) syscall number or hand-packed
    attribute struct in the product, and a node without libbpf is reported by
    STATUS (code 50) rather than failing every ADD. Run in a private mount
    namespace in which the library file is hidden."""
    for path in (REPO / "bwplugin").rglob("*.py"):
        text = path.read_text()
        assert "SYS_BPF" not in text and "syscall(" not in text, path
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    lib = next(line.split("=>")[1].strip() for line in listing.splitlines() if "libbpf.so.1 " in line)
    proc = status_in_private_mounts(
        f"mount --bind /dev/null {os.path.realpath(lib)}", env={"BWPLUGIN_RUN_DIR": str(tmp_path / "run")}
    )
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 50 and "libbpf" in err["msg"], (err, proc.stderr)
