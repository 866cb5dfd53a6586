#!/usr/bin/env bash
# Builds the node agent's OCI image (an OCI archive) with no container registry:
#   layer 1: a Debian 12 root filesystem from Debian's packages (mmdebstrap): python3,
#            bcc (python3-bpfcc with its LLVM), libbpf, prometheus-client, kubernetes;
#   layer 2: bwplugin, built here as a regular wheel and installed with the image's own
#            python3 -m installer, and the static forwarder (deploy/forwarder.c).
# As root on Debian 12 (mmdebstrap runs maintainer scripts in a chroot):
#   deploy/build-image.sh [-o bwplugin.oci.tar] [-t 0.1.0] [-s SOURCE_TREE] [-c CACHE_DIR]
# Then, on a node:  ctr -n k8s.io images import --base-name registry.example/bwplugin bwplugin.oci.tar
# or to a registry: skopeo copy oci-archive:bwplugin.oci.tar docker://REGISTRY/bwplugin:0.1.0
# The base layer is cached in CACHE_DIR by its package list, so rebuilding for a
# changed bwplugin takes seconds.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
OUT=$PWD/bwplugin.oci.tar
TAG=0.1.0
CACHE=${BWPLUGIN_IMAGE_CACHE:-/var/cache/bwplugin-image}
while getopts "o:t:s:c:" opt; do
  case $opt in
    o) OUT=$(realpath -m "$OPTARG") ;;
    t) TAG=$OPTARG ;;
    s) SRC=$(cd "$OPTARG" && pwd) ;;
    c) CACHE=$(realpath -m "$OPTARG") ;;
    *) echo "usage: $0 [-o OUT.tar] [-t TAG] [-s SOURCE_TREE] [-c CACHE_DIR]" >&2; exit 2 ;;
  esac
done

SUITE=bookworm
# python3-installer installs the wheel; libbpf1 makes bwplugin's bpf(2) calls
PACKAGES=python3,python3-bpfcc,libbpf1,python3-prometheus-client,python3-kubernetes,python3-installer

need=()
for tool in mmdebstrap umoci gcc; do command -v "$tool" > /dev/null || need+=("$tool"); done
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/aarch64-linux-gnu/libc.a ] || need+=(libc6-dev)
python3 -c "import venv, ensurepip" 2> /dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" > /dev/null
fi

WORK=$(mktemp -d /tmp/bwplugin-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE"

# ---- layer 1: the Debian root filesystem, cached by what goes into it
# merged /usr by mmdebstrap's own hook (as debootstrap makes it): the usrmerge package
# would pull in 55 MB of perl
ROOTFS_OPTS=(--variant=essential --include="$PACKAGES" --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*')
key=$(printf '%s\n' "$SUITE" "${ROOTFS_OPTS[@]}" | sha256sum | cut -c1-16)
BASE=$CACHE/base-$key.tar
if [ ! -s "$BASE" ]; then
  echo "build-image: Debian $SUITE root filesystem ($PACKAGES)" >&2
  mmdebstrap --quiet "${ROOTFS_OPTS[@]}" "$SUITE" "$CACHE/.base-$key.tmp.tar"
  mv "$CACHE/.base-$key.tmp.tar" "$BASE"
fi

# ---- layer 2: bwplugin as a wheel, and the forwarder
mkdir -p "$WORK/wheel" "$WORK/root/tmp/wheel" "$WORK/app/usr/local/libexec/bwplugin"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps -w "$WORK/wheel" "$SRC"
gcc -static -Os -s -Wall -o "$WORK/app/usr/local/libexec/bwplugin/bwplugin-forward" "$SRC/deploy/forwarder.c"
# the image's own python3 decides where the wheel goes (Debian's: /usr/local/lib/python3.11/
# dist-packages and /usr/local/bin): unpack the base, install into a separate destination
# inside it, and take only that as the layer
tar -xf "$BASE" -C "$WORK/root"
cp "$WORK"/wheel/*.whl "$WORK/root/tmp/wheel/"
wheel=$(basename "$WORK"/wheel/bwplugin-*.whl)
chroot "$WORK/root" python3 -m installer --destdir /tmp/app --prefix /usr "/tmp/wheel/$wheel"
cp -a "$WORK/root/tmp/app/." "$WORK/app/"
tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$WORK/app" -cf "$WORK/app.tar" .

# ---- the OCI image
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:$TAG"
umoci raw add-layer --image "$WORK/oci:$TAG" "$BASE"
umoci raw add-layer --image "$WORK/oci:$TAG" "$WORK/app.tar"
umoci config --image "$WORK/oci:$TAG" --author bwplugin \
  --config.env PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin \
  --config.cmd bwplugin-agent --config.label org.opencontainers.image.title=bwplugin-agent \
  --config.label org.opencontainers.image.version="$TAG"
umoci gc --layout "$WORK/oci"
tar --numeric-owner --owner=0 --group=0 -C "$WORK/oci" -cf "$OUT.tmp" .
mv "$OUT.tmp" "$OUT"
echo "build-image: $OUT (tag $TAG, $(du -m "$OUT" | cut -f1) MB compressed)" >&2
