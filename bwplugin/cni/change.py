"""A live change of a running attachment's shaping (`bwplugin set`, the agent's
annotation watch): which attachment, and what to change. Pure.

The request is a JSON object, so that the CLI, the agent's socket and the
annotation watch all hand the same document to the same validation:

    {"pod": "NAMESPACE/NAME", "container": ID, "veth": NAME, "ifname": IF,   (selector)
     "ingress": "30M" | "none", "ingressBurst": "1M",                         (to the pod)
     "egress": ..., "egressBurst": ...,                                       (from the pod)
     "shapedSubnets": [CIDR, ...] | "unshapedSubnets": [...],
     "reset": true,                                     (back to what ADD was given)
     "origin": "cli" | "watch"}

Rates are Kubernetes quantities in bits/s, as in the pod annotations
(`kubernetes.io/ingress-bandwidth: 10M`), within the runtimes' 1k..1P; bursts
are quantities in bits."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from .config import (
    MAX_BURST,
    MAX_RATE,
    MIN_RATE,
    SUBNET_KEYS,
    Subnets,
    networks_field,
    validate_ifname,
)
from .errors import InvalidConfigError, InvalidEnvError

ORIGINS = ("cli", "watch")
NONE = "none"  # lifts shaping in that direction

# Kubernetes resource.Quantity: <signed number><suffix>, the suffix binary (Ki..Ei),
# decimal SI (n, u, m, "", k, M, G, T, P, E) or a decimal exponent (e3, E-2)
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def parse_quantity(field: str, text: Any) -> int:
    """A Kubernetes quantity as an integer, rounded up as Quantity.Value() does.
    Hand-written rather than taken from the `kubernetes` client: importing its
    utils pulls in the whole API client, and the installed executable runs on
    the node's plain python3. The unit tests check it against that client."""
    if not isinstance(text, str) or not (m := _QUANTITY.match(text.strip())):
        raise InvalidConfigError(f"{field}={text!r} is not a Kubernetes quantity such as 10M, 1.5G or 512Ki")
    number, suffix = m.group(1), m.group(2) or ""
    try:
        value = Decimal(number)
        if suffix in _BINARY:
            value *= _BINARY[suffix]
        elif suffix in _DECIMAL:
            value = value.scaleb(_DECIMAL[suffix])
        else:
            value = value.scaleb(int(suffix[1:]))
    except (InvalidOperation, ValueError) as exc:
        raise InvalidConfigError(f"{field}={text!r} is not a Kubernetes quantity: {exc}") from exc
    return int(value.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Selector:
    """Which attachment: every given field must match, and exactly one must."""

    namespace: str = ""
    pod: str = ""
    container: str = ""  # a container ID, or an unambiguous prefix of one
    veth: str = ""  # the host-side veth
    ifname: str = ""

    def describe(self) -> str:
        parts = [f"pod {self.namespace}/{self.pod}"] if self.pod else []
        parts += [f"{k} {v}" for k, v in (("container", self.container), ("veth", self.veth), ("ifname", self.ifname))]
        return ", ".join(p for p in parts if not p.endswith(" "))


@dataclass(frozen=True)
class DirectionChange:
    """rate: None keeps it, 0 lifts shaping; burst: None keeps it (or, for a
    direction shaped anew, takes the runtimes' default burst)."""

    rate: int | None = None
    burst: int | None = None

    @property
    def given(self) -> bool:
        return self.rate is not None or self.burst is not None


@dataclass(frozen=True)
class Change:
    selector: Selector
    ingress: DirectionChange
    egress: DirectionChange
    subnets: Subnets | None  # None: keep the attachment's list
    reset: bool
    origin: str

    @property
    def empty(self) -> bool:
        return not (self.ingress.given or self.egress.given or self.subnets or self.reset)


KEYS = ("pod", "container", "veth", "ifname", "ingress", "ingressBurst", "egress", "egressBurst",
        *SUBNET_KEYS, "reset", "origin")  # fmt: skip


def _string(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise InvalidConfigError(f"{key} must be a string, got {value!r}")
    return value


def _direction(doc: Mapping[str, Any], name: str) -> DirectionChange:
    rate_text, burst_text = doc.get(name), doc.get(f"{name}Burst")
    rate = burst = None
    if rate_text is not None:
        if rate_text == NONE:
            rate = 0
        else:
            rate = parse_quantity(name, rate_text)
            if not MIN_RATE <= rate <= MAX_RATE:
                raise InvalidConfigError(f"{name}={rate_text!r} ({rate} bits/s) is outside 1k..1P bits/s")
    if burst_text is not None:
        if rate == 0:
            raise InvalidConfigError(f"{name}Burst={burst_text!r} is given but {name} is 'none'")
        burst = parse_quantity(f"{name}Burst", burst_text)
        if not 0 < burst <= MAX_BURST:
            raise InvalidConfigError(f"{name}Burst={burst_text!r} ({burst} bits) is outside 1..{MAX_BURST} bits")
    return DirectionChange(rate, burst)


def parse_change(doc: Any) -> Change:
    if not isinstance(doc, dict):
        raise InvalidConfigError(f"a change must be a JSON object, got {type(doc).__name__}")
    unknown = [k for k in doc if k not in KEYS]
    if unknown:
        raise InvalidConfigError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")
    pod = _string(doc, "pod")
    namespace = name = ""
    if pod:
        namespace, sep, name = pod.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise InvalidConfigError(f"pod={pod!r} must be NAMESPACE/NAME")
    selector = Selector(namespace, name, _string(doc, "container"), _string(doc, "veth"), _string(doc, "ifname"))
    if selector.ifname:
        try:
            validate_ifname("ifname", selector.ifname)
        except InvalidEnvError as exc:
            raise InvalidConfigError(exc.msg) from exc
    if not (selector.pod or selector.container or selector.veth):
        raise InvalidConfigError("select the attachment with pod (NAMESPACE/NAME), container or veth")
    present = [k for k in SUBNET_KEYS if k in doc]
    if len(present) == 2:
        raise InvalidConfigError("shapedSubnets and unshapedSubnets are mutually exclusive")
    subnets = None
    if present:
        subnets = Subnets(present[0] == "shapedSubnets", networks_field(present[0], doc[present[0]]))
    reset = doc.get("reset", False)
    if not isinstance(reset, bool):
        raise InvalidConfigError(f"reset must be true or false, got {reset!r}")
    origin = doc.get("origin", "cli")
    if origin not in ORIGINS:
        raise InvalidConfigError(f"origin={origin!r} must be one of {', '.join(ORIGINS)}")
    change = Change(selector, _direction(doc, "ingress"), _direction(doc, "egress"), subnets, reset, origin)
    if reset and (change.ingress.given or change.egress.given or change.subnets):
        raise InvalidConfigError("reset goes alone: it restores what ADD was given")
    if change.empty:
        raise InvalidConfigError("nothing to change: give ingress, egress, their bursts, subnets, or reset")
    return change
