"""The in-process door: CNI_* env and config on stdin in, result or spec error
JSON on stdout out (dispatched to one module per command), and the subcommands
for people (`bwplugin stats`, `bwplugin set`). No logic of its own beyond dispatch."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any

from .cni import settings
from .cni.config import (
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    Bandwidth,
    NetConf,
    Policy,
    decode,
    get,
    parse_env,
    parse_netconf,
    parse_version,
)
from .cni.errors import CNIError, DecodeError, InvalidConfigError, KernelError
from .cni.protocol import version_output
from .commands import add, check, delete, gc, status


def _error_version(doc: Mapping[str, Any] | None) -> str:
    version = get(doc, "cniVersion") if doc else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else LATEST_VERSION


def _lenient_conf(doc: Mapping[str, Any]) -> NetConf:
    """DEL must not fail on a config it can no longer parse (bad rates, policy):
    it needs only the version and the network name to find what to remove."""
    version = parse_version(doc)
    name = get(doc, "name")
    if not isinstance(name, str) or not name:
        raise InvalidConfigError(f"name must be a non-empty string, got {name!r}")
    prev = get(doc, "prevResult")
    return NetConf(version, name, Bandwidth(), Policy(), prev if isinstance(prev, dict) else None, raw=doc)


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """Returns (exit code, JSON to print or None). BWPLUGIN_TRACE=1 logs the time taken."""
    start = time.perf_counter()
    code, out = _run(environ, stdin)
    if settings.get("BWPLUGIN_TRACE") == "1":
        settings.log(
            f"{environ.get('CNI_COMMAND')} {environ.get('CNI_CONTAINERID', '')}/{environ.get('CNI_IFNAME', '')}: "
            f"exit {code} in {(time.perf_counter() - start) * 1000:.1f} ms"
        )
    return code, out


def _run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    doc: dict[str, Any] | None = None
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            requested = get(decode(stdin), "cniVersion") if stdin.strip() else None
            return 0, version_output(requested if isinstance(requested, str) else None)
        doc = decode(stdin)
        if env.command == "DEL":
            try:
                conf = parse_netconf(doc)
            except InvalidConfigError:
                conf = _lenient_conf(doc)
            delete.cmd_del(env, conf)
            return 0, None
        conf = parse_netconf(doc)
        if env.command == "ADD":
            return 0, add.cmd_add(env, conf)
        if env.command == "CHECK":
            check.cmd_check(env, conf)
        elif env.command == "GC":
            gc.cmd_gc(conf)
        elif env.command == "STATUS":
            status.cmd_status()
        return 0, None
    except CNIError as exc:
        return 1, exc.to_json(_error_version(doc))
    except RecursionError:  # a config nested deeper than Python can walk: hostile input
        return 1, DecodeError("network config is nested too deeply").to_json(_error_version(None))
    except OSError as exc:  # netlink or bpf syscall failure not mapped above
        return 1, KernelError(str(exc)).to_json(_error_version(doc))
    except Exception as exc:  # a bug: still answer in the spec's format
        err = CNIError(f"internal error: {exc.__class__.__name__}: {exc}", traceback.format_exc(limit=5))
        return 1, err.to_json(_error_version(doc))


def run_set(request: bytes) -> tuple[int, dict[str, Any]]:
    """A live change (a JSON document, see cni/change.py): (exit code, result or
    CNI-style error). The agent serves the same call for its socket's clients."""
    # imported here: ADD and DEL, the hot path through this module, never need them
    from .cni.change import parse_change
    from .commands import live

    try:
        return 0, live.cmd_set(parse_change(decode(request)))
    except CNIError as exc:
        return 1, exc.to_json(LATEST_VERSION)
    except OSError as exc:
        return 1, KernelError(str(exc)).to_json(LATEST_VERSION)
    except Exception as exc:  # a bug: still a CNI-style answer
        return 1, CNIError(f"internal error: {exc.__class__.__name__}: {exc}", traceback.format_exc(limit=5)).to_json(
            LATEST_VERSION
        )


SET_USAGE = """usage: bwplugin set (--pod NAMESPACE/NAME | --container ID | --veth NAME) [--ifname IF]
                    [--ingress RATE|none] [--ingress-burst BITS] [--egress RATE|none] [--egress-burst BITS]
                    [--shaped-subnets CIDR,... | --unshaped-subnets CIDR,...] [--reset] [--json]
Changes a running pod's shaping in place (no restart, no dropped connection).
RATE and BITS are Kubernetes quantities (10M, 1.5G, 512Ki) in bits/s and bits;
'none' lifts shaping in that direction; --reset restores what ADD was given."""


def set_request(argv: list[str]) -> tuple[bytes, bool]:
    """`bwplugin set` arguments as the JSON change document, and --json."""
    import argparse

    parser = argparse.ArgumentParser(prog="bwplugin set", usage=SET_USAGE, add_help=True)
    for flag in ("--pod", "--container", "--veth", "--ifname", "--ingress", "--ingress-burst", "--egress",
                 "--egress-burst", "--shaped-subnets", "--unshaped-subnets"):  # fmt: skip
        parser.add_argument(flag)
    parser.add_argument("--reset", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {}
    for key, value in (("pod", args.pod), ("container", args.container), ("veth", args.veth),
                       ("ifname", args.ifname), ("ingress", args.ingress), ("ingressBurst", args.ingress_burst),
                       ("egress", args.egress), ("egressBurst", args.egress_burst)):  # fmt: skip
        if value is not None:
            doc[key] = value
    for key, value in (("shapedSubnets", args.shaped_subnets), ("unshapedSubnets", args.unshaped_subnets)):
        if value is not None:
            doc[key] = [c.strip() for c in value.split(",") if c.strip()]
    if args.reset:
        doc["reset"] = True
    return json.dumps(doc).encode(), args.json


def print_set(code: int, out: dict[str, Any], as_json: bool) -> int:
    if code != 0:
        print(f"bwplugin set: {out.get('msg')} (code {out.get('code')})", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    a = out["attachment"]

    def rate(d: dict[str, Any]) -> str:
        return f"{d['rate']} bit/s ({d['source']})" if d["rate"] else f"unshaped ({d['source']})"

    who = f"{a['namespace']}/{a['pod']}" if a["pod"] else a["container_id"][:13]
    state = "changed" if out["changed"] else "unchanged"
    print(f"{who} {a['ifname']} (host veth {a['host_veth']}): {state}; ingress {rate(out['ingress'])}, "
          f"egress {rate(out['egress'])}; {out['changes']} live change(s)")  # fmt: skip
    return 0


def tool(argv: list[str]) -> int:
    """Subcommands for people (a runtime runs the plugin with no arguments)."""
    if argv[0] == "stats":
        from .commands.stats import main as stats

        return stats(argv[1:])
    if argv[0] == "set":  # in-process (the executable tries the agent first)
        request, as_json = set_request(argv[1:])
        return print_set(*run_set(request), as_json)
    if argv[0] in ("-h", "--help", "help"):
        print(
            "usage: bwplugin stats [--json] [--prometheus FILE]\n"
            f"{SET_USAGE}\n(with no arguments: a CNI plugin, as runtimes run it)"
        )
        return 0
    print(f"bwplugin: unknown subcommand {argv[0]!r}; try `bwplugin --help`", file=sys.stderr)
    return 2


def main(stdin: bytes | None = None) -> int:
    if stdin is None and len(sys.argv) > 1:
        return tool(sys.argv[1:])
    code, out = run(os.environ, sys.stdin.buffer.read() if stdin is None else stdin)
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
