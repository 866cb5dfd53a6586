"""CNI result handling: pass prevResult through, converted to the config's
cniVersion, and the shapes of VERSION output. Pure functions."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from .config import SUPPORTED_VERSIONS
from .errors import InvalidConfigError


def _major_at_least_1(version: str) -> bool:
    return int(version.split(".")[0]) >= 1


def convert_result(prev: dict[str, Any], version: str) -> dict[str, Any]:
    """Re-label a 0.3.0+ result for `version`. The shapes differ only in ips[].version,
    which 0.3.x/0.4.0 carry and 1.x dropped."""
    if "ip4" in prev or "ip6" in prev:
        raise InvalidConfigError("prevResult is a 0.2.0-style result (ip4/ip6), which is not supported")
    out = copy.deepcopy(prev)
    out["cniVersion"] = version
    ips = out.get("ips")
    if ips is not None:
        if not isinstance(ips, list):
            raise InvalidConfigError(f"prevResult.ips must be a list, got {ips!r}")
        for i, ip in enumerate(ips):
            if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
                raise InvalidConfigError(f"prevResult.ips[{i}] must have a string address, got {ip!r}")
            if _major_at_least_1(version):
                ip.pop("version", None)
            else:
                ip["version"] = str(_family(ip["address"], f"prevResult.ips[{i}].address"))
    return out


def _family(cidr: str, where: str) -> int:
    try:
        return ipaddress.ip_interface(cidr).version
    except ValueError as exc:
        raise InvalidConfigError(f"{where}={cidr!r} is not an IP address with prefix") from exc


def interfaces(result: dict[str, Any]) -> list[dict[str, Any]]:
    ifaces = result.get("interfaces", [])
    if not isinstance(ifaces, list) or not all(isinstance(i, dict) for i in ifaces):
        raise InvalidConfigError(f"prevResult.interfaces must be a list of objects, got {ifaces!r}")
    return ifaces


def host_interface_names(result: dict[str, Any]) -> list[str]:
    """Interfaces the previous plugin created in the host namespace (no sandbox)."""
    return [i["name"] for i in interfaces(result) if isinstance(i.get("name"), str) and not i.get("sandbox")]


def with_interface(result: dict[str, Any], name: str, mac: str) -> dict[str, Any]:
    out = copy.deepcopy(result)
    out.setdefault("interfaces", []).append({"name": name, "mac": mac})
    return out


def version_output(requested: str | None) -> dict[str, Any]:
    version = requested if requested in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def version_at_least(version: str, minimum: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    return key(version) >= key(minimum)
