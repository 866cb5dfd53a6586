#!/usr/bin/env bash
# Benchmarks, bwplugin vs the reference Go bandwidth plugin in one interleaved run.
#   bash scripts/bench.sh                  # quick profile, a few minutes
#   bash scripts/bench.sh --profile full   # longer
# Writes bench/results/<profile>.{json,md,png}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec python -m bench "$@"
