#!/usr/bin/env bash
# Idempotent node set-up for bwplugin, sourced by scripts/demo.sh and scripts/test.sh.
# Installs Debian's bcc, kernel headers, iperf3, the reference CNI plugins, and what
# the tests and the demo run for real (containerd, runc, bpftool, gcc for the lab's
# static pause binary), links
# headers for the running kernel when it ships none, mounts bpffs, and makes a venv
# (with system site-packages, to see python3-bpfcc) holding bwplugin in editable mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BWPLUGIN_VENV:-$ROOT/.venv}"

if [ "$(id -u)" != 0 ]; then echo "bwplugin set-up needs root (netlink, tc, bpf)" >&2; exit 1; fi

need=()
for pkg in python3-bpfcc linux-headers-amd64 iperf3 containernetworking-plugins python3-venv iputils-ping iproute2 \
    util-linux libbpf1 python3-prometheus-client python3-kubernetes containerd runc bpftool gcc libc6-dev ${SETUP_EXTRA_PACKAGES:-}; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build; link Debian's headers only
# when the running kernel has none of its own.
KDIR="/lib/modules/$(uname -r)"
if [ ! -e "$KDIR/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { echo "setup: no Debian kernel headers found under /usr/src" >&2; exit 1; }
  mkdir -p "$KDIR"
  ln -sfn "$hdr" "$KDIR/build"
  [ -e "$KDIR/source" ] || ln -sfn "${common:-$hdr}" "$KDIR/source"
  echo "setup: linked $KDIR/build -> $hdr"
fi

# the kernel (built-in bpf_preload) puts maps.debug and progs.debug into a fresh bpffs
# mount; they are its own and cannot be unlinked (EPERM): not a leftover of ours
mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=0700 bpf /sys/fs/bpf

if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.bwplugin-deps"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  # (this image points pip at an extra local index that may be absent: hide those warnings)
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]" 2> >(grep -v "^WARNING: Location" >&2)
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
