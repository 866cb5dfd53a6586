#!/usr/bin/env bash
# The main job: set up the node, install bwplugin as $CNI_BIN_DIR/bwplugin
# (default /opt/cni/bin), then run Kubernetes-annotated pods under a private, real
# containerd and measure them, next to the reference plugin (bench/demo.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
bwplugin-install --dir "${CNI_BIN_DIR:-/opt/cni/bin}"
exec python -m bench.demo "$@"
