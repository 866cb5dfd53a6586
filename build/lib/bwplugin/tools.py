"""Subcommands for people (a runtime runs the plugin with no arguments)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[0] == "stats":
        from .stats import main as stats

        return stats(argv[1:])
    if argv[0] in ("-h", "--help", "help"):
        print(
            "usage: bwplugin stats [--json] [--prometheus FILE]\n(with no arguments: a CNI plugin, as runtimes run it)"
        )
        return 0
    print(f"bwplugin: unknown subcommand {argv[0]!r}; try `bwplugin stats --help`", file=sys.stderr)
    return 2
