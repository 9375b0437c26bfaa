#!/usr/bin/env bash
# Build the deployment image (docker/Dockerfile) with BuildKit, and skip the build when an image
# built from the same inputs already exists (label splitmix.inputs: a hash of the Dockerfile, the
# build context's files, the base image id and the build args).
#
# Usage: docker/build_image.sh [TAG]                 (default: splitmix-fl:latest)
# Environment (all optional):
#   BASE_IMAGE     base image; default python:3.11-slim when present or pullable, else the local
#                  Debian bookworm image from docker/build_base_image.sh (no registry needed)
#   TORCH_INDEX    extra index for torch (default: the PyTorch CPU index when it answers, else
#                  empty: torch from the package index alone, on Linux the large CUDA build)
#   TORCH_PACKAGES e.g. "torch==2.14.1 torchvision==0.29.1"
#   PIP_INDEX_URL  private package index   } passed as BuildKit secrets (never in a layer);
#   CA_BUNDLE      PEM bundle for that index } defaults: pip's own settings (pip config list:
#                  index-url / cert, or $PIP_CERT)
#   FORCE=1        build even if the inputs are unchanged
# Prints the tag as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-splitmix-fl:latest}
say() { echo "build_image: $*" >&2; }

# A docker client that builds with BuildKit: buildx when installed, else a client older than 23
# (which has BuildKit built in; newer clients without buildx refuse DOCKER_BUILDKIT=1).
BUILD=()
for d in $(type -ap docker) /usr/bin/docker; do
  if "$d" buildx version >/dev/null 2>&1; then BUILD=("$d" buildx build --load); DOCKER=$d; break; fi
  major=$("$d" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
  if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then BUILD=(env DOCKER_BUILDKIT=1 "$d" build); DOCKER=$d; break; fi
done
if [ ${#BUILD[@]} = 0 ]; then say "no docker client that builds with BuildKit (install docker-buildx, or a docker CLI < 23)"; exit 1; fi

if [ -z "${BASE_IMAGE:-}" ]; then
  if "$DOCKER" image inspect python:3.11-slim >/dev/null 2>&1 || timeout 120 "$DOCKER" pull -q python:3.11-slim >/dev/null 2>&1; then
    BASE_IMAGE=python:3.11-slim
  else
    say "python:3.11-slim not pullable: using a local Debian bookworm base (docker/build_base_image.sh)"
    docker/build_base_image.sh splitmix-base:bookworm >&2
    BASE_IMAGE=splitmix-base:bookworm
  fi
fi
if [ -z "${TORCH_INDEX+set}" ]; then
  TORCH_INDEX=https://download.pytorch.org/whl/cpu
  if ! python3 - "$TORCH_INDEX/torch/" <<'PY' >/dev/null 2>&1; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=20)
PY
    say "$TORCH_INDEX does not answer: torch from the package index (on Linux the CUDA build, a large image)"
    TORCH_INDEX=
  fi
fi
TORCH_PACKAGES=${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}

pip_get() { python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" | head -1; }
PIP_INDEX_URL=${PIP_INDEX_URL:-$(pip_get index-url)}
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-$(pip_get cert)}}
SECRETS=()
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ -n "$PIP_INDEX_URL" ]; then printf '%s' "$PIP_INDEX_URL" >"$TMP/index"; SECRETS+=(--secret "id=pip_index_url,src=$TMP/index"); fi
if [ -n "$CA_BUNDLE" ]; then SECRETS+=(--secret "id=ca_bundle,src=$CA_BUNDLE"); fi

# The inputs: every file the context sends (docker/Dockerfile.dockerignore's allow-list), the
# Dockerfile, the base image's id and the build args.
base_id=$("$DOCKER" image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || echo "$BASE_IMAGE")
inputs=$({
  echo "$base_id|$TORCH_INDEX|$TORCH_PACKAGES"
  find pyproject.toml README.md server clients models strategies techniques tools deploy splitmix \
    docker/Dockerfile docker/Dockerfile.dockerignore docker/pip_secrets.sh docker/healthcheck.py \
    -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum
} | sha256sum | cut -c1-16)
if [ -z "${FORCE:-}" ] && [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "splitmix.inputs"}}' "$TAG" 2>/dev/null || true)" = "$inputs" ]; then
  say "$TAG is up to date (inputs $inputs)"
  echo "$TAG"; exit 0
fi
say "building $TAG from $BASE_IMAGE (inputs $inputs)"
"${BUILD[@]}" -f docker/Dockerfile -t "$TAG" --label "splitmix.inputs=$inputs" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX=$TORCH_INDEX" --build-arg "TORCH_PACKAGES=$TORCH_PACKAGES" \
  ${SECRETS[@]+"${SECRETS[@]}"} --progress plain . >&2
echo "$TAG"
