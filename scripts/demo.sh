#!/usr/bin/env bash
# The main job: set up the node, install bwplugin as $CNI_BIN_DIR/bwplugin
# (default /opt/cni/bin), then shape two test pods and measure them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
bwplugin-install --dir "${CNI_BIN_DIR:-/opt/cni/bin}"
exec bwplugin-demo "$@"
