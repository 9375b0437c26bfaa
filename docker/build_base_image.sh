#!/usr/bin/env bash
# Build a local Debian bookworm base image with Python 3.11 (bookworm's python3) when no image
# registry is reachable, so `docker build --build-arg BASE_IMAGE=<tag>` needs no `docker pull`.
# debootstrap fetches the packages from this machine's configured apt mirror (the first
# deb.debian.org-style URI in /etc/apt/sources.list[.d]) unless MIRROR is set; the root file
# system is then handed to `docker import`. Needs root, debootstrap and a running docker engine.
#
# Usage: docker/build_base_image.sh [TAG]      (default: splitmix-base:bookworm; ~1.5 min, ~300 MB)
#        MIRROR=http://deb.debian.org/debian docker/build_base_image.sh
# Skips the work when TAG already exists (FORCE=1 rebuilds).
set -euo pipefail
TAG=${1:-splitmix-base:bookworm}
if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG exists (FORCE=1 rebuilds)"; exit 0
fi
if [ -z "${MIRROR:-}" ]; then
  # deb822 sources ("URIs: …") or one-line sources ("deb URI suite …"): the first Debian archive.
  MIRROR=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* \
    | grep -v security | sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//' | awk '{print $1; exit}' || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
ROOT=$(mktemp -d /tmp/splitmix-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap bookworm from $MIRROR into $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -20 "$ROOT.log"; exit 1; }
# pip may install into the system Python of an image (PEP 668's marker is for shared hosts);
# `python` means python3 as in the official python images; no apt lists in the image.
rm -f "$ROOT"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf python3 "$ROOT/usr/bin/python"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb
tar -C "$ROOT" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$TAG" >/dev/null
rm -f "$ROOT.log"
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)"
