#!/usr/bin/env bash
# Issue 11 on one multi-GPU host, in calls of at most 10 minutes (the device tool's limit): each phase is one
# call, and a phase that runs out of time checkpoints (time_limit_minutes) so that the same phase resumes.
#
#   benchmarks/multi_gpu_run.sh setup       # random 8B-shaped students (32 and 8 layers) and the token arrays
#   benchmarks/multi_gpu_run.sh megatron    # 128K TP=2 x CP=2: starts, or resumes from its last checkpoint
#   benchmarks/multi_gpu_run.sh zero3       # 32K DeepSpeed ZeRO-3 over all GPUs (throughput, no mid checkpoint)
#   benchmarks/multi_gpu_run.sh scaling     # the 8-layer student at SCALING_LEN: 1 -> 2 -> 4 GPUs
#   benchmarks/multi_gpu_run.sh report      # summary of every run so far
#
# Environment: WORK (students, runs; default /dev/shm/sala11: fast to write, kept while the machine is),
# CALL_SECONDS (the time a phase may take, checkpoint included; default 560) or DEADLINE (epoch seconds),
# CKPT_SECONDS (kept back for the checkpoint write at the time limit; default 150), STEPS (the 128K run's steps,
# default 50), GPUS (default: all), PY (default python3), EXTRA (Hydra overrides for every run; CPU smoke tests),
# SMALL=1 (tiny-width students), SETUP_8L=0 (setup skips the 8-layer student of the scaling phase), OUT (a folder
# that receives metrics files). Wheels in .whl/ are installed into /tmp/site first when hydra, deepspeed or
# megatron-core are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
STARTED=$(date +%s)
PY=${PY:-python3}
WORK=${WORK:-/dev/shm/sala11}
CALL_SECONDS=${CALL_SECONDS:-560}
CKPT_SECONDS=${CKPT_SECONDS:-150}
STEPS=${STEPS:-50}
SEQ=${SEQ:-131072}
ZERO3_SEQ=${ZERO3_SEQ:-32768}
SCALING_LEN=${SCALING_LEN:-32768}
GPUS=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
EXTRA=${EXTRA:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"

if ! $PY -c "import hydra, deepspeed, megatron.core" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    if [ ! -f /tmp/site/.installed ]; then
        # only what these runs import: .whl/ may also hold wheels for other work (matplotlib, pillow, packaging)
        # whose copies in /tmp/site would shadow the image's own versions
        wheels=$(ls .whl/{antlr4_python3_runtime,hydra_core,omegaconf,deepspeed,hjson,pydantic,pydantic_core,annotated_types,typing_inspection,megatron_core}-*.whl 2>/dev/null)
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
            && touch /tmp/site/.installed || exit 1
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import sala_train" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1

DATA="$WORK/sample.bin"
data_override="stages.0.data.sources=[{path: $DATA, type: tokens}]"
DEADLINE=${DEADLINE:-$((STARTED + CALL_SECONDS))}  # export DEADLINE to share one call's time between phases
left() { echo $(( DEADLINE - $(date +%s) )); }

summary() {  # summary RUN_DIR: steps, median tokens/s and MFU after the first step of each start, peak memory
    $PY - "$1" <<'EOF'
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()] \
    if (run / "metrics.jsonl").exists() else []
steps = [r for r in rows if "tokens_per_s" in r]
if not steps:
    print(f"{run}: no steps logged"); sys.exit()
# the first step after every (re)start pays for compilation and loading: starts.txt holds the metrics line
# count at each start (written by train() below)
starts = {int(x) for x in (run / "starts.txt").read_text().split()} if (run / "starts.txt").exists() else {0}
first = set()
for start in starts:
    after = [i for i, r in enumerate(rows) if i >= start and "tokens_per_s" in r]
    if after:
        first.add(after[0])
timed = [r for i, r in enumerate(rows) if "tokens_per_s" in r and i not in first]
by_step = {}
for r in steps:
    by_step.setdefault(r["global_step"], []).append(r["loss"])
repeated = {s: v for s, v in by_step.items() if len(v) > 1}
med = lambda k: statistics.median(r[k] for r in timed) if timed and k in timed[0] else float("nan")
print(f"{run.name}: {len(by_step)} steps (last {steps[-1]['global_step']}), starts {len(first)}, "
      f"median tokens/s {med('tokens_per_s'):.0f}, MFU {100 * med('mfu'):.1f}%, "
      f"model TFLOP/s {med('model_tflops'):.0f}, "
      f"peak {max(r.get('peak_memory_gib', 0) for r in steps):.1f} GiB/GPU, loss {steps[0]['loss']:.3f} -> "
      f"{steps[-1]['loss']:.3f}; steps logged twice: {repeated or 'none'}")
EOF
}

train() {  # train RUN_DIR EXPERIMENT [overrides...]: one torchrun, stopped by the time limit in time to checkpoint
    local run=$1 experiment=$2; shift 2
    if [ ! -f "$WORK/sala-8b/config.json" ] || [ ! -f "$DATA" ]; then
        echo "no student or data in $WORK: run the setup phase first (a machine given back loses /dev/shm)"; return 1
    fi
    local limit=$(( $(left) - CKPT_SECONDS ))
    if (( limit < 60 )); then echo "too little time left ($(left) s) to start $run"; return 1; fi
    echo "== $run: $experiment on $GPUS GPUs, time limit $limit s ($(date -u +%T))"
    mkdir -p "$run"; cat "$run/metrics.jsonl" 2>/dev/null | wc -l >> "$run/starts.txt"
    $PY -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m sala_train.train "+experiment=$experiment" \
        run_dir="$run" time_limit_minutes=$(awk "BEGIN {print $limit / 60}") logging.progress=false "$@" $EXTRA
    local code=$?
    local how=finished
    [ -f "$run/preempted.json" ] && how="stopped at the time limit: $(cat "$run/preempted.json")"
    echo "== torchrun exit code $code ($(date -u +%T)); $how"
    summary "$run"
    [ -n "${OUT:-}" ] && cp "$run/metrics.jsonl" "$OUT/$(basename "$run").metrics.jsonl" 2>/dev/null
    du -sh "$run"/checkpoints/* 2>/dev/null
    return 0
}

case "${1:-}" in
    setup)
        df -h "$WORK" | tail -1
        small=${SMALL:+--small}
        [ -f "$WORK/sala-8b/config.json" ] || $PY benchmarks/random_student.py --out "$WORK/sala-8b" $small || exit 1
        [ "${SETUP_8L:-1}" = 0 ] || [ -f "$WORK/sala-8b-8l/config.json" ] \
            || $PY benchmarks/random_student.py --out "$WORK/sala-8b-8l" --layers 8 $small || exit 1
        if [ -f .carry/sample.bin ]; then cp .carry/sample.bin .carry/sample.idx "$WORK/"
        else
            text=$($PY -c 'from sala_train.tokenizer import DEFAULT_SAMPLE_TEXT as t; print(t)')
            $PY -m sala_train.data.pretokenize --source "$text" --type text --text-unit document --out "$DATA" \
                --cache-dir "$WORK/cache" || exit 1
        fi
        ;;
    megatron)
        train "$WORK/runs/megatron-128k" minicpm_sala_8b_128k_tp2cp2 student="$WORK/sala-8b" "$data_override" \
            stages.0.seq_len=$SEQ stages.0.global_batch_tokens=$SEQ stages.0.tokens=$((STEPS * SEQ)) \
            stages.0.save_every=0 \
            keep_last=1  # a 9.5B checkpoint with sharded AdamW is about 160 GB
        ;;
    zero3)
        ckpts="$WORK/runs/megatron-128k/checkpoints"
        if ls -d "$ckpts"/stage-01-* >/dev/null 2>&1; then  # the 128K run finished: room for ZeRO-3's files
            rm -rf "$ckpts"/stage-00-*
        fi
        train "$WORK/runs/zero3-32k" minicpm_sala_8b_32k_zero3 student="$WORK/sala-8b" "$data_override" \
            stages.0.seq_len=$ZERO3_SEQ stages.0.global_batch_tokens=$((ZERO3_SEQ * GPUS)) \
            stages.0.tokens=$((STEPS * ZERO3_SEQ * GPUS)) stages.0.save_every=0 keep_last=1
        ;;
    scaling)
        points="1:1x1 2:1x2 4:2x2"; (( GPUS >= 4 )) || points="1:1x1 2:1x2"
        $PY benchmarks/scaling.py --experiment minicpm_sala_8b_128k_tp2cp2 --student "$WORK/sala-8b-8l" \
            --seq-len "$SCALING_LEN" --points $points --steps ${SCALING_STEPS:-5} --out "$WORK/runs/scaling" \
            -- "$data_override" $EXTRA
        ;;
    report)
        for run in "$WORK"/runs/*/ "$WORK"/runs/scaling/*/; do [ -f "$run/metrics.jsonl" ] && summary "$run"; done
        ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
