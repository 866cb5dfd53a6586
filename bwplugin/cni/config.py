"""Pure parsing and validation of the CNI environment and network config.

Nothing here touches the kernel; every error names the field and the value.

Keys are matched as Go's encoding/json matches them (the reference plugin and
every runtime's CNI library are Go): exactly or case-insensitively, the last
spelling in the object winning. containerd, for one, sends
runtimeConfig.bandwidth with Go field names ("IngressRate"), CRI-O lower-case."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from .errors import DecodeError, IncompatibleVersionError, InvalidConfigError, InvalidEnvError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

BANDWIDTH_KEYS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")
MIN_RATE = 1_000  # bits/s; containerd accepts 1k..1P
MAX_RATE = 10**15  # 1 Pbit/s
MAX_BURST = 8 * (2**32) - 1  # the reference's "burst cannot be more than 4GB" (burst/8 < 2^32)
DEFAULT_LATENCY_MS = 25.0
DEFAULT_MAX_BURST_MS = 10.0
SUBNET_KEYS = ("shapedSubnets", "unshapedSubnets")
MAX_SUBNETS = 64  # per attachment
REDIRECT_MODES = ("auto", "bpf", "mirred")
ATTACH_MODES = ("auto", "tcx", "tc")

# CNI_ARGS keys a runtime sends for Kubernetes pods (containerd, CRI-O, multus)
POD_ARGS = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID", "K8S_POD_INFRA_CONTAINER_ID")
KNOWN_ARGS = ("IgnoreUnknown", *POD_ARGS)

_CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s]")


@dataclass(frozen=True)
class PodRef:
    """The Kubernetes pod behind an attachment, from CNI_ARGS (empty when the
    runtime is not a Kubernetes one)."""

    namespace: str = ""
    name: str = ""
    uid: str = ""

    @property
    def known(self) -> bool:
        return bool(self.namespace or self.name)


@dataclass(frozen=True)
class Env:
    """The CNI_* environment, validated for the command at hand."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: tuple[str, ...] = ()

    @property
    def pod(self) -> PodRef:
        return PodRef(
            self.args.get("K8S_POD_NAMESPACE", ""), self.args.get("K8S_POD_NAME", ""), self.args.get("K8S_POD_UID", "")
        )


@dataclass(frozen=True)
class Direction:
    """Shaping for one direction: rate in bits/s, burst in bits (as CNI passes them)."""

    rate: int
    burst: int


@dataclass(frozen=True)
class Bandwidth:
    ingress: Direction | None = None  # traffic into the pod
    egress: Direction | None = None  # traffic out of the pod
    source: str = "none"  # "static", "runtimeConfig" or "none"

    @property
    def shaped(self) -> bool:
        return self.ingress is not None or self.egress is not None


@dataclass(frozen=True)
class Policy:
    """How rates become queues: queue bounded by latency, burst capped by time;
    and how pod egress reaches its ifb (eBPF redirect, or act_mirred before 6.4)."""

    latency_ms: float = DEFAULT_LATENCY_MS
    max_burst_ms: float = DEFAULT_MAX_BURST_MS  # 0 disables the cap
    egress_redirect: str = "auto"  # "auto" (probe the kernel), "bpf" or "mirred"
    tc_attach: str = "auto"  # counting programs on TCX links ("tcx", Linux 6.6+) or cls_bpf ("tc"); auto: probe


@dataclass(frozen=True)
class Subnets:
    """shapedSubnets (only these peers are shaped) or unshapedSubnets (all but these)."""

    listed_shaped: bool  # True: shapedSubnets; False: unshapedSubnets
    networks: tuple[IPv4Network | IPv6Network, ...]

    @property
    def key(self) -> str:
        return "shapedSubnets" if self.listed_shaped else "unshapedSubnets"


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    bandwidth: Bandwidth
    policy: Policy
    prev_result: dict[str, Any] | None
    valid_attachments: tuple[Attachment, ...] | None = None
    subnets: Subnets | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- environment


def parse_env(environ: Mapping[str, str]) -> Env:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise InvalidEnvError("CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise InvalidEnvError(f"CNI_COMMAND={command!r} is not one of {', '.join(COMMANDS)}")
    if command in ("VERSION", "GC", "STATUS"):
        return Env(command=command, path=_split_path(environ.get("CNI_PATH", "")))

    cid = environ.get("CNI_CONTAINERID", "")
    if not cid:
        raise InvalidEnvError("CNI_CONTAINERID is not set")
    if not _CONTAINER_ID.match(cid):
        raise InvalidEnvError(f"CNI_CONTAINERID={cid!r} must match {_CONTAINER_ID.pattern}")
    ifname = environ.get("CNI_IFNAME", "")
    validate_ifname("CNI_IFNAME", ifname)
    netns = environ.get("CNI_NETNS", "")
    if command != "DEL" and not netns:  # DEL may come after the netns is gone
        raise InvalidEnvError("CNI_NETNS is not set")
    return Env(
        command=command,
        container_id=cid,
        netns=netns,
        ifname=ifname,
        # DEL must clean up whatever CNI_ARGS says: it reads them leniently
        args=parse_cni_args(environ.get("CNI_ARGS", ""), strict=command != "DEL"),
        path=_split_path(environ.get("CNI_PATH", "")),
    )


def validate_ifname(what: str, ifname: str) -> None:
    if not ifname:
        raise InvalidEnvError(f"{what} is not set")
    if len(ifname.encode()) > 15:
        raise InvalidEnvError(f"{what}={ifname!r} is longer than 15 bytes")
    if ifname in (".", "..") or _IFNAME_BAD.search(ifname):
        raise InvalidEnvError(f"{what}={ifname!r} is not a valid interface name")


def parse_cni_args(text: str, strict: bool = True) -> dict[str, str]:
    """K=V;K2=V2 as libcni's LoadArgs reads it: a malformed pair is an error, and
    so is a key bwplugin does not know, unless IgnoreUnknown is true (runtimes
    send IgnoreUnknown=1). strict=False (DEL) keeps what parses and drops the rest."""
    out: dict[str, str] = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            if strict:
                raise InvalidEnvError(f"CNI_ARGS entry {pair!r} is not KEY=VALUE")
            continue
        out[key] = value
    if not strict:
        return out
    ignore = out.get("IgnoreUnknown", "false")
    if ignore.lower() not in ("1", "true", "0", "false"):
        raise InvalidEnvError(f"CNI_ARGS IgnoreUnknown={ignore!r} is not a boolean (1, true, 0 or false)")
    unknown = [k for k in out if k not in KNOWN_ARGS]
    if unknown and ignore.lower() not in ("1", "true"):
        raise InvalidEnvError(
            f"CNI_ARGS has unknown key(s) {', '.join(unknown)}; known: {', '.join(KNOWN_ARGS)} (or set IgnoreUnknown=1)"
        )
    return out


def _split_path(text: str) -> tuple[str, ...]:
    return tuple(p for p in text.split(":") if p)


# ---------------------------------------------------------------- config


def folded(doc: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """casefolded key -> (key as sent, value); a later spelling wins, as in Go."""
    return {str(k).casefold(): (str(k), v) for k, v in doc.items()}


def get(doc: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """doc[key] matched as Go's encoding/json matches a struct field's name."""
    hit = folded(doc).get(key.casefold())
    return default if hit is None else hit[1]


def has(doc: Mapping[str, Any], key: str) -> bool:
    return key.casefold() in folded(doc)


def decode(stdin: bytes | str) -> dict[str, Any]:
    """JSON-decode the config; anything that is not a JSON object is code 6."""
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("failed to decode network config from stdin", str(exc)) from exc
    except RecursionError as exc:  # hostile input: thousands of nested arrays
        raise DecodeError("failed to decode network config from stdin: nested too deeply") from exc
    if not isinstance(doc, dict):
        raise DecodeError(f"network config must be a JSON object, got {type(doc).__name__}")
    return doc


def parse_version(doc: Mapping[str, Any]) -> str:
    version = get(doc, "cniVersion")
    if version is None:
        raise InvalidConfigError("cniVersion is required")
    if not isinstance(version, str):
        raise InvalidConfigError(f"cniVersion must be a string, got {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise IncompatibleVersionError(
            f"cniVersion {version!r} is not supported",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def parse_netconf(doc: Mapping[str, Any]) -> NetConf:
    version = parse_version(doc)
    name = get(doc, "name")
    if not isinstance(name, str) or not name:
        raise InvalidConfigError(f"name must be a non-empty string, got {name!r}")
    prev = get(doc, "prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise InvalidConfigError(f"prevResult must be an object, got {type(prev).__name__}")
    return NetConf(
        cni_version=version,
        name=name,
        bandwidth=parse_bandwidth(doc),
        policy=parse_policy(doc),
        prev_result=prev,
        valid_attachments=parse_valid_attachments(doc),
        subnets=parse_subnets(doc),
        raw=doc,
    )


def parse_bandwidth(doc: Mapping[str, Any]) -> Bandwidth:
    """Static keys win if any is present (even 0), as in the reference plugin."""
    if any(has(doc, k) for k in BANDWIDTH_KEYS):
        return _bandwidth_from(doc, "", "static")
    bw = runtime_bandwidth(doc)
    if bw is None:
        return Bandwidth()
    return _bandwidth_from(bw, "runtimeConfig.bandwidth.", "runtimeConfig")


def runtime_bandwidth(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """runtimeConfig.bandwidth, checked for keys bwplugin cannot read. An unread
    key is an error, not a warning: a pod asked for shaping and would silently
    get none (as happened with containerd's spelling); a failed sandbox shows in
    the pod's events, a warning in the runtime's log is read by nobody."""
    runtime = get(doc, "runtimeConfig")
    if runtime is None:
        return None
    if not isinstance(runtime, dict):
        raise InvalidConfigError(f"runtimeConfig must be an object, got {runtime!r}")
    bw = get(runtime, "bandwidth")
    if bw is None:
        return None
    if not isinstance(bw, dict):
        raise InvalidConfigError(f"runtimeConfig.bandwidth must be an object, got {bw!r}")
    known = {k.casefold() for k in (*BANDWIDTH_KEYS, *SUBNET_KEYS)}
    for key in bw:
        if str(key).casefold() not in known:
            raise InvalidConfigError(
                f"runtimeConfig.bandwidth.{key}={bw[key]!r} is not a key bwplugin knows "
                f"(known, in any letter case: {', '.join((*BANDWIDTH_KEYS, *SUBNET_KEYS))})"
            )
    return bw


def _bandwidth_from(src: Mapping[str, Any], prefix: str, source: str) -> Bandwidth:
    def direction(name: str) -> Direction | None:
        keys = folded(src)
        rate_hit = keys.get(f"{name}rate", (f"{name}Rate", 0))
        burst_hit = keys.get(f"{name}burst", (f"{name}Burst", 0))
        rate_key, burst_key = prefix + rate_hit[0], prefix + burst_hit[0]  # named as sent
        rate = uint_field(rate_key, rate_hit[1], MAX_RATE)
        burst = uint_field(burst_key, burst_hit[1], MAX_BURST)
        if rate == 0 and burst == 0:
            return None
        if rate == 0:
            raise InvalidConfigError(f"{burst_key}={burst} is set but {rate_key} is not: set both or neither")
        if burst == 0:
            raise InvalidConfigError(f"{rate_key}={rate} is set but {burst_key} is not: set both or neither")
        if rate < MIN_RATE:
            raise InvalidConfigError(f"{rate_key}={rate} is below the minimum of {MIN_RATE} bits/s")
        return Direction(rate=rate, burst=burst)

    return Bandwidth(ingress=direction("ingress"), egress=direction("egress"), source=source)


def uint_field(key: str, value: Any, maximum: int) -> int:
    """A non-negative integer (JSON ints, or floats with no fraction) up to maximum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"{key} must be a non-negative integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidConfigError(f"{key} must be a non-negative integer, got {value!r}")
    number = int(value)
    if number < 0:
        raise InvalidConfigError(f"{key} must be a non-negative integer, got {number}")
    if number > maximum:
        raise InvalidConfigError(f"{key}={number} exceeds the maximum of {maximum}")
    return number


def _number_field(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidConfigError(f"{key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidConfigError(f"{key}={value} must be between {low:g} and {high:g}")
    return float(value)


def parse_policy(doc: Mapping[str, Any]) -> Policy:
    mode = get(doc, "egressRedirect", "auto")
    if mode not in REDIRECT_MODES:
        raise InvalidConfigError(f"egressRedirect={mode!r} must be one of {', '.join(REDIRECT_MODES)}")
    return Policy(
        latency_ms=_number_field("latencyMs", get(doc, "latencyMs", DEFAULT_LATENCY_MS), 1, 10_000),
        max_burst_ms=_number_field("maxBurstMs", get(doc, "maxBurstMs", DEFAULT_MAX_BURST_MS), 0, 60_000),
        egress_redirect=mode,
        tc_attach=_choice("tcAttach", get(doc, "tcAttach", "auto"), ATTACH_MODES),
    )


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidConfigError(f"{name}={value!r} must be one of {', '.join(allowed)}")
    return str(value)


def parse_subnets(doc: Mapping[str, Any]) -> Subnets | None:
    """Top-level keys win over runtimeConfig.bandwidth's, as the rates do."""
    runtime = get(doc, "runtimeConfig")
    bw = get(runtime, "bandwidth") if isinstance(runtime, dict) else None
    for src, prefix in ((doc, ""), (bw, "runtimeConfig.bandwidth.")):
        if not isinstance(src, dict):
            continue
        present = [k for k in SUBNET_KEYS if get(src, k) is not None]
        if len(present) == 2:
            raise InvalidConfigError(f"{prefix}shapedSubnets and {prefix}unshapedSubnets are mutually exclusive")
        if present:
            key = present[0]
            nets = networks_field(prefix + key, get(src, key))
            return Subnets(key == "shapedSubnets", nets) if nets else None
    return None


def networks_field(key: str, value: Any) -> tuple[IPv4Network | IPv6Network, ...]:
    if not isinstance(value, list):
        raise InvalidConfigError(f"{key} must be a list of CIDRs, got {value!r}")
    if len(value) > MAX_SUBNETS:
        raise InvalidConfigError(f"{key} has {len(value)} entries; at most {MAX_SUBNETS} are supported")
    out: list[IPv4Network | IPv6Network] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or "/" not in item:
            raise InvalidConfigError(f"{key}[{i}]={item!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8")
        try:
            net = ip_network(item, strict=True)
        except ValueError as exc:
            raise InvalidConfigError(f"{key}[{i}]={item!r} is not a valid CIDR: {exc}") from exc
        if net not in out:
            out.append(net)
    return tuple(out)


def parse_valid_attachments(doc: Mapping[str, Any]) -> tuple[Attachment, ...] | None:
    """GC's list; libcni sends both spellings (1.1.0 text says cni.dev/attachments)."""
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        if has(doc, key):
            items = get(doc, key)
            if not isinstance(items, list):
                raise InvalidConfigError(f"{key} must be a list, got {items!r}")
            out = []
            for i, item in enumerate(items):
                cid = get(item, "containerID") if isinstance(item, dict) else None
                ifname = get(item, "ifname") if isinstance(item, dict) else None
                if not isinstance(cid, str) or not isinstance(ifname, str):
                    raise InvalidConfigError(f"{key}[{i}] must have string containerID and ifname, got {item!r}")
                out.append(Attachment(cid, ifname))
            return tuple(out)
    return None
