#!/usr/bin/env bash
# The whole test suite (unit + kernel integration) plus ruff and mypy. Run as root:
# the kernel tests then must run (BWPLUGIN_REQUIRE_KERNEL=1 turns a skip into a failure).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the tests also run a real Prometheus (each its own private instance) and build the
# DaemonSet image (mmdebstrap, umoci), and drive the lab's chains through the real libcni
# (Go and Debian's libcni source, built by the tests). Note: on a machine
# with systemd, Debian's prometheus package also starts its own service when installed.
SETUP_EXTRA_PACKAGES="prometheus mmdebstrap umoci openssl golang-go golang-github-appc-cni-dev" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
ruff check bwplugin tests bench
ruff format --check bwplugin tests bench
mypy
if [ "$(id -u)" = 0 ]; then export BWPLUGIN_REQUIRE_KERNEL=1; fi
exec pytest -q "$@"
