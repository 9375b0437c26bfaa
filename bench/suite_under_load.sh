#!/usr/bin/env bash
# The fast tier (`make test-fast`'s pytest command) on a deliberately overloaded machine: two
# busy loops pinned to each core beside pytest, so the load average sits near 2 × nproc + 1.
# A test whose outcome depends on how fast the machine is (a fixed sleep, a short timeout, a
# race against a background process) fails here. Prints pytest's summary and the wall time and
# exits with pytest's status. The busy loops are killed on every exit (trap), also on Ctrl-C.
#
#   bash bench/suite_under_load.sh            # fast tier, 2 loops per core
#   LOOPS_PER_CORE=4 bash bench/suite_under_load.sh tests/unit   # other load / other paths
set -u
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LOOPS_PER_CORE=${LOOPS_PER_CORE:-2}
CORES=$(nproc)

busy=()
stop_load() {
    for pid in "${busy[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${busy[@]}"; do wait "$pid" 2>/dev/null; done
    busy=()
}
trap stop_load EXIT
trap 'exit 130' INT TERM

for core in $(seq 0 $((CORES - 1))); do
    for _ in $(seq 1 "$LOOPS_PER_CORE"); do
        taskset -c "$core" sh -c 'while :; do :; done' &
        busy+=("$!")
    done
done
echo "load: ${#busy[@]} busy loops on $CORES core(s); load average now: $(cut -d' ' -f1-3 /proc/loadavg)"

paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(tests/unit tests/integration)
start=$(date +%s)
log=$(mktemp)
"$PY" -m pytest -q -m "not slow" "${paths[@]}" 2>&1 | tee "$log"  # streamed: a long run shows its progress
status=${PIPESTATUS[0]}
wall=$(($(date +%s) - start))
echo "summary: $(grep -E '^=*.* (passed|failed|error)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//')"
echo "wall time: ${wall} s under ${#busy[@]} busy loops on $CORES core(s); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -f "$log"
exit "$status"
