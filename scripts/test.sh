#!/usr/bin/env bash
# The whole test suite (unit + kernel integration) plus ruff and mypy. Needs root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
ruff check bwplugin tests bench
mypy
exec pytest -q "$@"
