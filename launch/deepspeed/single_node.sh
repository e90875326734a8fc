#!/usr/bin/env bash
# `divico train` on one machine through the DeepSpeed launcher: one rank per GPU.
#
#   launch/deepspeed/single_node.sh --gpus 0,1,2,3 --logs runs/x/logs/divico -- \
#       --config configs/llava15_lora.yaml --config configs/methods/divico.yaml \
#       train.output_dir=runs/x/divico [--resume auto]
#   DS_ACCELERATOR=cpu launch/deepspeed/single_node.sh --ranks 2 --logs DIR -- --config ...
#
# Everything after -- goes to `divico train`. Each rank writes <logs>/<time>_rank<N>.log
# (deepspeed --enable_each_rank_log); the launcher's own messages go to the terminal.
# MASTER_PORT picks the rendezvous port (default: a free one).
set -euo pipefail

usage="usage: $0 (--gpus 0,1,2,3 | --ranks N with DS_ACCELERATOR=cpu) --logs DIR -- TRAIN_ARGS"
die() { echo "single_node.sh: $*" >&2; exit 2; }

gpus="" ranks="" logs=""
while (($#)); do
    case $1 in
        --gpus) gpus=${2:-}; shift 2 || die "--gpus needs a value" ;;
        --ranks) ranks=${2:-}; shift 2 || die "--ranks needs a value" ;;
        --logs) logs=${2:-}; shift 2 || die "--logs needs a value" ;;
        --) shift; break ;;
        *) die "unknown argument '$1'; $usage" ;;
    esac
done
[[ -n $logs ]] || die "--logs DIR is required (each rank's log goes there); $usage"
(($#)) || die "no training arguments after --; $usage"
source "$(dirname "$0")/checks.sh"
check_train_args "$@"
command -v deepspeed >/dev/null || die "deepspeed is not on PATH: activate the project's environment"

if [[ ${DS_ACCELERATOR:-} == cpu ]]; then
    [[ -z $gpus ]] || die "DS_ACCELERATOR=cpu runs CPU ranks: use --ranks N, not --gpus"
    [[ $ranks =~ ^[1-9][0-9]*$ ]] || die "--ranks must be a positive integer (got '$ranks')"
    placement=(--num_gpus "$ranks")
else
    [[ -z $ranks ]] || die "--ranks is for CPU ranks (DS_ACCELERATOR=cpu); on GPUs use --gpus 0,1,2,3"
    [[ $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must list GPU indices like 0,1,2,3 (got '$gpus')"
    available=$(count_gpus)
    for gpu in ${gpus//,/ }; do
        ((gpu < available)) || die "--gpus $gpus: GPU $gpu does not exist; this machine has $available GPU(s) (nvidia-smi -L)"
    done
    [[ $(tr ',' '\n' <<<"$gpus" | sort | uniq -d) == "" ]] || die "--gpus $gpus lists a GPU twice"
    placement=(--include "localhost:$gpus")
fi

mkdir -p "$logs"
port=${MASTER_PORT:-$(free_port)}
exec deepspeed "${placement[@]}" --master_port "$port" --enable_each_rank_log "$logs" \
    --module pipeline.cli train "$@"
