#!/usr/bin/env bash
# Build the Molecule host image (Debian 12 + systemd) without a registry, idempotently:
# the base comes from debootstrap and the image is rebuilt only when its Dockerfile changes.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
base="${RAYINFER_BASE_IMAGE:-rayinfer-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
name="${MOLECULE_IMAGE:-rayinfer-molecule}"
sources=/etc/apt/sources.list.d/debian.sources

if ! docker image inspect "$base" >/dev/null 2>&1; then
  mirror="${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' "$sources" 2>/dev/null || true)}"
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$(mktemp -d /var/tmp/rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap $suite from $mirror -> $base"
  debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >/dev/null
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
fi

tag="$(cat "$here/molecule-image/Dockerfile" <(docker image inspect -f '{{.Id}}' "$base") \
       | sha256sum | cut -c1-12)"
if docker image inspect "$name:$tag" >/dev/null 2>&1; then
  echo "$name:$tag is up to date"
else
  docker build --build-arg "BASE=$base" -t "$name:$tag" "$here/molecule-image"
fi
docker tag "$name:$tag" "$name:bookworm"
