"""CHECK: every object of the attachment, compared with what the config asks for."""

from __future__ import annotations

from ..cni.config import Direction, Env, NetConf
from ..cni.errors import CheckMismatchError, IncompatibleVersionError, InvalidConfigError
from ..cni.protocol import version_at_least
from ..datapath import bpf, probe, tc, tcx
from ..datapath.naming import ifb_name
from ..datapath.netlink import Link, Netlink
from ..datapath.shaping import TBFParams, htb_leaf_limit, tbf_params
from . import handover
from .common import HostVeth, entry_flags, find_host_veth, in_force, owner_of, recorded_redirect


def cmd_check(env: Env, conf: NetConf) -> None:
    if not version_at_least(conf.cni_version, "0.4.0"):
        raise IncompatibleVersionError(f"CHECK is not supported for cniVersion {conf.cni_version} (needs 0.4.0+)")
    if conf.prev_result is None:
        raise InvalidConfigError("prevResult is required for CHECK")
    problems: list[str] = []
    with Netlink() as nl:
        host = find_host_veth(nl, env, conf.prev_result)
        attach_id = tc.our_classid(nl, host.index)
        with handover.settled([attach_id] if attach_id else []):  # not in the middle of the agent's handover
            _check(nl, problems, env, conf, host)
    if problems:
        raise CheckMismatchError("shaping state does not match the config: " + "; ".join(problems))


def _check(nl: Netlink, problems: list[str], env: Env, conf: NetConf, host: HostVeth) -> None:
    live = _after_live_changes(nl, problems, conf, host)
    bw = live.bandwidth
    lifted = live is not conf  # set live to no rate at all: the counting filters stay
    conf = live
    name = ifb_name(conf.name, env.container_id, env.ifname)
    ifb = nl.link(name=name)
    filters = tc.our_filters(nl, host.index)
    if not bw.shaped:
        if (filters and not lifted) or tc.is_our_root(tc.root_qdisc(nl, host.index)) or ifb is not None:
            problems.append(f"{host.name}: shaped by bwplugin but no rate is configured")
    else:
        _check_root(nl, problems, f"ingress qdisc on {host.name}", host.index, bw.ingress, conf, host)
        if bw.egress:
            if ifb is None or ifb.kind != "ifb":
                problems.append(f"ifb {name}: missing")
                ifb = None
            else:
                if not ifb.up:
                    problems.append(f"ifb {name}: down")
                _check_root(nl, problems, f"egress qdisc on {name}", ifb.index, bw.egress, conf, host)
        elif ifb is not None:
            problems.append(f"ifb {name}: present but no egress rate is configured")
        _check_steering(nl, problems, env, conf, host, filters, ifb)


def _after_live_changes(nl: Netlink, problems: list[str], conf: NetConf, host: HostVeth) -> NetConf:
    """The runtime's CHECK carries ADD's config; after `bwplugin set` (or the
    annotation watch) the attachment's record says what is in force instead."""
    attach_id = tc.our_classid(nl, host.index)
    fd = bpf.open_shaping() if attach_id else None
    if fd is None or attach_id is None:
        return conf
    lpm_fd = bpf.open_lpm()
    try:
        shaping = bpf.shaping_get(fd, attach_id)
        if shaping is None or not shaping.flags & bpf.S_OVERRIDES:
            return conf
        listed = bpf.subnets_of(lpm_fd, attach_id) if lpm_fd is not None and conf.subnets else []
        if shaping.flags & bpf.S_SUBNETS_OVERRIDE and bpf.subnets_digest(listed) != shaping.subnets_digest:
            problems.append(f"attach map entry {attach_id}: subnets {sorted(map(str, listed))} are not those set live")
        return in_force(conf, shaping, listed)
    finally:
        bpf.close_fds(fd, lpm_fd)


def _check_root(
    nl: Netlink, problems: list[str], what: str, index: int, d: Direction | None, conf: NetConf, host: HostVeth
) -> None:
    mtu = host.mtu
    q = tc.root_qdisc(nl, index)
    if d is None:
        if tc.is_our_root(q):
            problems.append(f"{what}: present but this direction has no rate")
        return
    want = tbf_params(d, conf.policy, mtu, host.gso_max)
    kind = "htb" if conf.subnets else "tbf"
    if q is None or q.kind != kind or q.handle != tc.ROOT_HANDLE:
        problems.append(f"{what}: expected bwplugin's {kind} b0d0:, found {q.kind if q is not None else 'none'}")
        return
    if kind == "tbf":
        _compare_tbf(problems, what, want, tc.tbf_state(q))
        return
    classes = tc.htb_classes(nl, index)
    shaped = classes.get(tc.CLASS_SHAPED)
    leaf = tc.shaped_leaf(nl, index)
    if leaf is not None and leaf.kind == "bfifo":  # a legacy build's HTB: the class holds the rate
        limit = tc.bfifo_limit(leaf)
        actual = (shaped.rate, limit or 0, shaped.buffer_ticks) if shaped else None
        expected = (want.rate, htb_leaf_limit(want, mtu), want.htb_buffer_ticks)
        _compare(problems, f"{what} class b0d0:1", expected, actual)
    else:
        if shaped is None or shaped.rate != tc.CLASSIFY_RATE:
            found = f"rate {shaped.rate} B/s" if shaped else "missing"
            problems.append(f"{what}: class b0d0:1 expected rate {tc.CLASSIFY_RATE} B/s (it only sorts), {found}")
        if leaf is None or leaf.kind != "tbf" or leaf.handle != tc.LEAF_TBF.handle:
            found = leaf.kind if leaf is not None else "none"
            problems.append(f"{what}: expected bwplugin's tbf b0d1: under class b0d0:1, found {found}")
        else:
            _compare_tbf(problems, f"{what} tbf b0d1:", want, tc.tbf_state(leaf))
    if tc.CLASS_UNSHAPED not in classes:
        problems.append(f"{what}: unshaped class b0d0:2 missing")


def _compare_tbf(problems: list[str], what: str, want: TBFParams, got: tc.TBFState | None) -> None:
    actual = (got.rate, got.limit, got.buffer_ticks) if got else None
    _compare(problems, what, (want.rate, want.limit, want.buffer_ticks), actual)


def _compare(problems: list[str], what: str, want: tuple[int, int, int], got: tuple[int, int, int] | None) -> None:
    if got is None:
        problems.append(f"{what}: cannot read its parameters")
        return
    for field, expected, actual in zip(("rate", "limit", "buffer"), want, got, strict=True):
        # the kernel stores the bucket as a time and reports it rounded: allow 0.1 %
        tolerance = max(2, expected // 1000) if field == "buffer" else 0
        if abs(expected - actual) > tolerance:
            problems.append(f"{what}: {field} expected {expected}, actual {actual}")


HOOK_NAMES = {tc.CLSACT_INGRESS: "from-pod", tc.CLSACT_EGRESS: "to-pod"}


def _redirect_mode(progs: bpf.Programs, conf: NetConf, record: bpf.ShapingEntry | None) -> str:
    """The redirect the attachment must use. Under "auto", the one its ADD chose,
    as recorded: a probe answers per boot and program version, and an upgraded
    agent probes again. Records of older builds say nothing: probe."""
    requested = conf.policy.egress_redirect
    if requested == "auto" and record is not None:
        requested = recorded_redirect(record.flags)
    return probe.redirect_mode(progs, requested)


def _check_steering(
    nl: Netlink,
    problems: list[str],
    env: Env,
    conf: NetConf,
    host: HostVeth,
    filters: dict[tuple[int, int], tc.BPFFilter],
    ifb: Link | None,
) -> None:
    """The clsact filters, the programs they run, their place among other tools'
    filters, and the map entries they read."""
    if tc.clsact_qdisc(nl, host.index) is None:
        problems.append(f"clsact on {host.name}: missing")
    progs = bpf.open_pinned()
    if progs is None:
        problems.append(f"eBPF programs: not pinned under {bpf.pin_dir()}")
        return
    try:
        tail = filters.get((tc.CLSACT_INGRESS, tc.TAIL_PRIO))
        record = bpf.shaping_get(progs.shaping_fd, tail.classid) if tail is not None else None
        on_tcx = record is not None and bool(record.flags & bpf.S_TCX)  # how ADD counted
        # an agent that died in the middle of its handover left it for its next start:
        # counting is either still cls_bpf's, or already the links' (the claim says which)
        pending = record is not None and bool(record.flags & bpf.S_TCX_PENDING)
        if pending and tail is not None:
            claim = bpf.tcx_claim_of(progs.tcx_fd, host.index, raw=True) or 0
            on_tcx = claim == tail.classid | bpf.TCX_COUNTS
        mode = _redirect_mode(progs, conf, record) if conf.bandwidth.egress else "bpf"
        mirred_to = ifb.index if ifb is not None and mode == "mirred" else None
        want = {(tc.CLSACT_INGRESS, tc.TAIL_PRIO): ("bwp_from_pod_mirred" if mirred_to else "bwp_from_pod", mirred_to)}
        if not on_tcx:
            want[(tc.CLSACT_EGRESS, tc.FRONT_PRIO)] = ("bwp_to_pod", None)
            want[(tc.CLSACT_INGRESS, tc.FRONT_PRIO)] = ("bwp_count_from_pod", None)
        ids = set()
        for (hook, prio), (prog, target) in want.items():
            flt = filters.get((hook, prio))
            where = f"{HOOK_NAMES[hook]} filter prio {prio:#x} on {host.name}"
            if flt is None:
                problems.append(f"{where}: missing")
                continue
            ids.add(flt.classid)
            # a filter attached by an older build of the same map layout keeps running
            # its own program (pinned by the filter): it counts and steers correctly
            older_build = flt.name.startswith(f"bwplugin:{prog}_") and flt.name != progs.filter_name(prog)
            current = flt.name == progs.filter_name(prog) and flt.prog_id == progs.prog_id(prog)
            if not (current or older_build) or flt.direct_action != (target is None):
                problems.append(f"{where}: runs {flt.name} (prog id {flt.prog_id}), expected {prog}")
            if flt.mirred_ifindex != target:
                problems.append(f"{where}: redirects to ifindex {flt.mirred_ifindex}, expected {target}")
        for hook in HOOK_NAMES:
            _check_order(problems, host, hook, tc.hook_filters(nl, host.index, hook), counted=on_tcx)
        owner = owner_of(conf, env)
        if on_tcx:
            _check_tcx(problems, progs, owner, host)
        elif tcx.pinned(owner) and not pending:
            problems.append(f"TCX links of {host.name}: present, but this attachment counts with cls_bpf filters")
        if len(ids) != 1:
            if len(ids) > 1:
                problems.append(f"filters on {host.name}: carry different attachment ids {sorted(ids)}")
            return
        attach_id = ids.pop()
        _check_entry(problems, progs, attach_id, env, conf, host, ifb)
        if on_tcx:
            _check_claim(problems, progs, attach_id, owner, host)
    finally:
        progs.close()


def _check_order(
    problems: list[str], host: HostVeth, hook: int, chain: list[tc.HookFilter], counted: bool = False
) -> None:
    """Other tools' filters may share the hooks, but not so that the pod's packets
    can miss the shaper. Before our counting filter only filters that provably
    continue are safe (anything else may end classification, drop or redirect,
    and we would never see the packet); between it and our redirect, one that
    certainly ends classification lets the pod's traffic out unshaped.
    counted: a TCX link counts, before any clsact filter runs."""
    where = f"{HOOK_NAMES[hook]} hook of {host.name}"
    ours = [i for i, f in enumerate(chain) if f.ours]
    if not ours:
        return  # reported as missing filters
    for f in [] if counted else chain[: ours[0]]:
        if f.verdict != "continue":
            problems.append(
                f"{where}: expected bwplugin's counting filter (prio {tc.FRONT_PRIO:#x}) before any filter that can "
                f"take the pod's packets, found {f.describe()} before it"
            )
    if hook == tc.CLSACT_INGRESS:
        for f in chain[0 if counted else ours[0] + 1 : ours[-1]]:
            if f.verdict == "ends":
                problems.append(
                    f"{where}: expected the pod's packets to reach bwplugin's redirect (prio {tc.TAIL_PRIO:#x}), "
                    f"found {f.describe()} before it: they would leave unshaped"
                )


def _check_tcx(problems: list[str], progs: bpf.Programs, owner: int, host: HostVeth) -> None:
    """Our links exist, hold our programs on this veth, and run first on each TCX
    hook: a program in front of ours could take the pod's packets before they are
    counted and classified."""
    links = tcx.pinned(owner)
    for hook, prog in tcx.PROGRAM.items():
        where = f"TCX {hook} link on {host.name}"
        link = links.get(hook)
        if link is None or link.info is None:
            problems.append(f"{where}: missing (expected pinned at {tcx.pin_path(owner, hook)})")
            continue
        info = link.info
        if info.type != bpf.BPF_LINK_TYPE_TCX or info.attach_type != tcx.HOOKS[hook]:
            problems.append(f"{where}: expected a TCX {hook} link, found link type {info.type}/{info.attach_type}")
            continue
        if info.ifindex != host.index:
            actual = "none (defunct)" if info.ifindex == 0 else f"ifindex {info.ifindex}"
            problems.append(f"{where}: attached to {actual}, expected ifindex {host.index}")
            continue
        name = bpf.prog_name(info.prog_id)
        if info.prog_id != progs.prog_id(prog) and not prog.startswith(name or "?"):
            problems.append(f"{where}: runs prog id {info.prog_id} ({name}), expected {prog}")
        chain = tcx.chain(host.index, hook)
        if not chain or chain[0] != info.prog_id:
            first = f"prog id {chain[0]} ({bpf.prog_name(chain[0])})" if chain else "no program"
            problems.append(
                f"TCX {hook} hook of {host.name}: expected bwplugin's {prog} (prog id {info.prog_id}) first, "
                f"found {first} before it"
            )


def _check_claim(problems: list[str], progs: bpf.Programs, attach_id: int, owner: int, host: HostVeth) -> None:
    """Links running this build's programs count only while the veth's claim says
    so (TCX_COUNTS, set at the handover); those of builds before the handover read
    the whole claim as the id, and another build's may be either."""
    links = tcx.pinned(owner)
    current = all(
        (link := links.get(hook)) is not None and link.info is not None and link.info.prog_id == progs.prog_id(prog)
        for hook, prog in tcx.PROGRAM.items()
    )
    want = {attach_id | bpf.TCX_COUNTS} if current else {attach_id | bpf.TCX_COUNTS, attach_id}
    got = bpf.tcx_claim_of(progs.tcx_fd, host.index, raw=True)
    if got not in want:
        actual = "none" if got is None else f"{got:#x}"
        expected = " or ".join(f"{w:#x}" for w in sorted(want, reverse=True))
        problems.append(f"TCX claim of ifindex {host.index} ({host.name}): expected {expected}, actual {actual}")


def _check_entry(
    problems: list[str], progs: bpf.Programs, attach_id: int, env: Env, conf: NetConf, host: HostVeth, ifb: Link | None
) -> None:
    entry = bpf.attach_get(progs.map_fd, attach_id)
    what = f"attach map entry {attach_id}"
    if entry is None:
        problems.append(f"{what}: missing")
        return
    expected = (owner_of(conf, env), host.index, ifb.index if ifb else 0, entry_flags(conf))
    actual = (entry.owner, entry.host_index, entry.ifb_index, entry.flags)
    for field, want, got in zip(("owner", "host ifindex", "ifb ifindex", "flags"), expected, actual, strict=True):
        if want != got:
            problems.append(f"{what}: {field} expected {want}, actual {got}")
    listed = set(bpf.subnets_of(progs.lpm_fd, attach_id)) if entry.flags & bpf.F_SUBNETS else set()
    configured = set(conf.subnets.networks) if conf.subnets else set()
    if listed != configured:
        problems.append(f"{what}: subnets expected {sorted(map(str, configured))}, actual {sorted(map(str, listed))}")
