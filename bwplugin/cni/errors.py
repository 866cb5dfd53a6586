"""Named CNI errors. Every failure the plugin reports is one of these, so the
CLI can turn it into the spec's error JSON with the right code."""

from __future__ import annotations

from typing import Any


class CNIError(Exception):
    """Base: a CNI error with a spec code, a message and optional details."""

    code = 999

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# Codes 1-99 are reserved by the CNI spec (SPEC.md "Error codes").
class IncompatibleVersionError(CNIError):
    code = 1


class ContainerUnknownError(CNIError):
    """No attachment matches (a live change naming a pod bwplugin does not shape)."""

    code = 3


class InvalidEnvError(CNIError):
    code = 4


class IOFailureError(CNIError):
    code = 5


class DecodeError(CNIError):
    code = 6


class InvalidConfigError(CNIError):
    code = 7


class TryAgainLaterError(CNIError):
    code = 11


class NotAvailableError(CNIError):
    """STATUS: the plugin cannot serve ADDs on this node right now."""

    code = 50


# Plugin-specific codes (100+), documented in the README.
class HostInterfaceError(CNIError):
    """The pod's host-side veth cannot be found or is not a veth."""

    code = 100


class ForeignObjectError(CNIError):
    """A qdisc or device we did not create is in the way; we never replace it."""

    code = 101


class CheckMismatchError(CNIError):
    """CHECK found shaping state missing or different from the config."""

    code = 102


class KernelError(CNIError):
    """A netlink or bpf syscall failed in a way that is not the caller's fault."""

    code = 103


class BPFUnavailableError(CNIError):
    """The eBPF program cannot be compiled or loaded (bcc, headers, bpffs)."""

    code = 104


class KernelFeatureError(KernelError):
    """The kernel lacks a qdisc, classifier, action or device kind we need."""

    code = 105
