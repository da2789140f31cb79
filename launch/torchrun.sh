#!/usr/bin/env bash
# Start sala-train on this node under torchrun: one worker per GPU (or --nproc-per-node), single or multi-node.
#
#   launch/torchrun.sh --nproc-per-node 2 +experiment=tiny_cpu student=S teacher=T run_dir=R    # one node
#   MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh --nnodes 2 --node-rank 0 +experiment=...  # on node0
#   MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh --nnodes 2 --node-rank 1 +experiment=...  # on node1
#
# Options (each also read from the environment variable in brackets; under SLURM from SLURM_* variables):
#   --nproc-per-node N   workers on this node        [NPROC_PER_NODE; else SLURM_GPUS_ON_NODE; else GPUs; else 1]
#   --nnodes N           nodes in the job            [NNODES; else SLURM_NNODES; else 1]
#   --node-rank R        this node's rank, 0..N-1    [NODE_RANK; else SLURM_NODEID; else 0]
#   --master-addr HOST   head node (multi-node)      [MASTER_ADDR]
#   --master-port PORT   rendezvous port (multi-node) [MASTER_PORT; else 29500]
#   --module M           the entry point             [default sala_train.train]
# Everything else (after an optional --) is passed to the entry point: Hydra overrides.
#
# One node runs torchrun --standalone (a private rendezvous on a free local port). Several nodes meet through
# c10d rendezvous at MASTER_ADDR:MASTER_PORT (the rendezvous id is the SLURM job id when there is one); c10d
# numbers the nodes itself, so --node-rank is a label there (it orders the nodes only with RDZV_BACKEND=static).
# The python is $PYTHON (default: python on PATH); PYTHONSAFEPATH=1 so that the folders of the repository
# checkout never shadow the installed sala_train package. SIGUSR1 is ignored by this script and torchrun (it would
# kill torchrun) and handled by the trainer, which checkpoints and stops (see docs/launch.md, preemption).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch/torchrun.sh: $*" >&2; echo "run launch/torchrun.sh --help for the options" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --list-gpus 2>/dev/null | wc -l; else echo 0; fi
}

nproc_per_node=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
module=sala_train.train
overrides=()
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --nproc-per-node|--nproc_per_node|--nnodes|--node-rank|--node_rank|--master-addr|--master_addr|\
        --master-port|--master_port|--module)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --nproc-per-node|--nproc_per_node) nproc_per_node=$2 ;;
                --nnodes) nnodes=$2 ;;
                --node-rank|--node_rank) node_rank=$2 ;;
                --master-addr|--master_addr) master_addr=$2 ;;
                --master-port|--master_port) master_port=$2 ;;
                --module) module=$2 ;;
            esac
            shift 2 ;;
        --) shift; overrides+=("$@"); break ;;
        --*) die "unknown option $1 (Hydra overrides have no leading dashes: key=value, +key=value)" ;;
        *) overrides+=("$1"); shift ;;
    esac
done

if [[ -z "$nproc_per_node" ]]; then
    nproc_per_node=$(gpu_count)
    ((nproc_per_node > 0)) || nproc_per_node=1
fi
is_count "$nproc_per_node" && ((nproc_per_node >= 1)) \
    || die "--nproc-per-node (NPROC_PER_NODE) must be a positive whole number, got '$nproc_per_node'"
is_count "$nnodes" && ((nnodes >= 1)) || die "--nnodes (NNODES) must be a positive whole number, got '$nnodes'"
is_count "$node_rank" && ((node_rank < nnodes)) \
    || die "--node-rank (NODE_RANK) must be a whole number below --nnodes $nnodes, got '$node_rank'"
is_count "$master_port" && ((master_port >= 1 && master_port <= 65535)) \
    || die "--master-port (MASTER_PORT) must be a TCP port 1..65535, got '$master_port'"

python=${PYTHON:-python}
command -v "$python" >/dev/null 2>&1 || die "no python '$python' (set PYTHON to the interpreter that has sala-train)"

launcher=("$python" -m torch.distributed.run --nproc-per-node "$nproc_per_node")
if ((nnodes == 1)); then
    launcher+=(--standalone)
else
    [[ -n "$master_addr" ]] || die "multi-node (--nnodes $nnodes) needs the head node's address: set MASTER_ADDR or \
pass --master-addr (under SLURM, launch/slurm/train.sbatch sets it from scontrol show hostnames)"
    launcher+=(--nnodes "$nnodes" --rdzv-backend "${RDZV_BACKEND:-c10d}" --rdzv-endpoint "$master_addr:$master_port"
               --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-sala-train}}")
    if [[ "${RDZV_BACKEND:-c10d}" == static ]]; then  # node ranks fixed by hand instead of by the rendezvous
        launcher+=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
    fi
fi

export PYTHONSAFEPATH=1
trap '' USR1  # inherited through exec by torchrun and its workers; the trainer installs its own handler
exec "${launcher[@]}" -m "$module" "${overrides[@]}"
