#!/usr/bin/env bash
# Generate the deployment's TLS material and SuperNode keys next to docker-compose.yml:
#   certificates/  ca.crt, ca.key, server.pem, server.key  (SuperLink TLS; SAN: superlink,
#                  localhost, 127.0.0.1, ::1 and every extra host given as an argument)
#   keys/          supernode-0 … supernode-3 (+ .pub)      (SuperNode authentication)
# Both folders are mounted read-only into the containers.
#
# Usage: docker/generate_certs.sh [EXTRA_HOST ...]   e.g. docker/generate_certs.sh 192.168.1.20 fl.example.org
# Uses the project's `splitmix deploy certs|keys` (Python `cryptography`); run `make setup` first,
# or it falls back to the image: docker compose build && docker compose run ... (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-4}
if [ -x .venv/bin/splitmix ]; then SPLITMIX=.venv/bin/splitmix
elif command -v splitmix >/dev/null; then SPLITMIX=splitmix
else
  SPLITMIX="docker compose run --rm --no-deps -v $PWD:/work -w /work --entrypoint splitmix superlink"
fi
hosts=()
for h in "$@"; do hosts+=(--host "$h"); done
$SPLITMIX deploy certs --out certificates ${hosts[@]+"${hosts[@]}"}  # (bash 3.2: empty arrays under set -u)
$SPLITMIX deploy keys --out keys --nodes "$NODES"
# Containers run as uid 49999 (as Flower's images do): hand them the private keys.
if [ "$(id -u)" = 0 ]; then
  chown -R 49999:49999 certificates keys
else
  echo "note: run 'sudo chown -R 49999:49999 certificates keys' so the containers (uid 49999) can read the private keys"
fi
