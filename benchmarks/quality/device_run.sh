#!/usr/bin/env bash
# The conversion quality study on a GPU machine of the device tool, one call at a time (docs/quality.md).
#
#   run(command="bash benchmarks/quality/device_run.sh", carry=["benchmarks/quality/data", ".whl"])
#
# Installs the project (wheels from .whl/, no registry there), starts `study.py all` in its own process session
# (setsid: it outlives the call while the machine stays warm) unless it is already running, waits for it up to
# WAIT seconds, and packs the results into $OUT/quality.tgz (results JSON, plans, HALO scores, timings, report,
# plots) with the log. A study still running at the end goes on; the same call again, back to back, waits for it.
# On a fresh machine it starts from the beginning: every step skips or resumes what is on disk, nothing more.
# STUDY_ARGS passes options to study.py, e.g. STUDY_ARGS="--scale full_copy2560" (run 3's teacher).
set -u
PY=${PY:-python3}
WAIT=${WAIT:-570}
STUDY_ARGS=${STUDY_ARGS:-}
OUT=${OUT:-/tmp/quality-out}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1
$PY -m pip install -q --no-index --find-links .whl hydra-core matplotlib 2>&1 | tail -n 2
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 2
running() { pgrep -f "benchmarks/quality/study.py all" > /dev/null; }
if running; then
    echo "device_run: the study is already running (started by an earlier call); waiting for it"
elif [ -f runs/quality/results/study.json ]; then  # (written by the last step, the report)
    echo "device_run: the study is done on this machine; packing its results"
else
    # shellcheck disable=SC2086 (STUDY_ARGS: several words)
    setsid nohup $PY benchmarks/quality/study.py all --quiet $STUDY_ARGS >> runs/quality.log 2>&1 < /dev/null &
    sleep 2
fi
while running && [ "$SECONDS" -lt "$WAIT" ]; do sleep 2; done
running && echo "device_run: still running after ${SECONDS} s; call again (back to back) to wait for the rest"
cp runs/quality.log "$OUT/quality.log" 2>/dev/null
tar czf "$OUT/quality.tgz" --ignore-failed-read runs/quality/results runs/quality/plans runs/quality/timings.json \
    runs/quality/select/scores.csv runs/quality/select/plan.json runs/quality/teacher/metrics.jsonl \
    runs/quality/train/*/metrics.jsonl \
    docs/quality.md docs/quality_*.png 2> /dev/null
grep -E "^evaluated|retrieval_|selected|Error|error" runs/quality.log | tail -n 20
tail -n 3 runs/quality.log
cat runs/quality/timings.json 2> /dev/null
