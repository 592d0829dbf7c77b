#!/usr/bin/env bash
# The default test suite under a CPU-bound load, with torch's thread and determinism settings varied:
# what a busy laptop or a shared CI runner does to the suite.
#
#   bash tests/stress.sh                 # 3 rounds with 2 threads, 1 with OMP_NUM_THREADS=1, 1 deterministic
#   ROUNDS=1 bash tests/stress.sh -x     # fewer rounds; extra arguments go to pytest
#   LOAD_THREADS=4 bash tests/stress.sh  # a heavier load (threads of the background matrix products)
#
# Each round starts a background process that multiplies matrices on LOAD_THREADS threads (2 by
# default: the cores of this project's machines) for the whole round, then runs `pytest -q` beside it.
# Prints one line per round and a last line "stress: N passed, M failed" (rounds); exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
LOAD_THREADS=${LOAD_THREADS:-2}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t dfq-stress-XXXX)}
mkdir -p "$LOG_DIR"

load() {
    python -c "
import torch
torch.set_num_threads($LOAD_THREADS)
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a * 0.03)
" &
    LOAD_PID=$!
}

passed=0
failed=0
round() {  # round NAME ENV... : one suite run beside the load
    local name=$1
    shift
    load
    local start=$SECONDS
    env "$@" python -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    kill "$LOAD_PID" 2>/dev/null
    wait "$LOAD_PID" 2>/dev/null
    local summary
    summary=$(tail -n 1 "$LOG_DIR/$name.log")
    echo "round $name: exit $rc in $((SECONDS - start)) s: $summary (log: $LOG_DIR/$name.log)"
    if [ "$rc" -eq 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

PYTEST_ARGS=("$@")
echo "load: $LOAD_THREADS threads of matrix products beside each round; logs in $LOG_DIR"
for i in $(seq 1 "$ROUNDS"); do
    round "loaded-$i"
done
round "omp1" OMP_NUM_THREADS=1
round "deterministic" DFQ_TEST_DETERMINISTIC=1
echo "stress: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
