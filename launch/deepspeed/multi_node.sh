#!/usr/bin/env bash
# `divico train` on several machines through the DeepSpeed launcher, from a hostfile.
#
#   launch/deepspeed/multi_node.sh --hostfile hosts.txt --logs DIR -- --config configs/x.yaml [key=value ...]
#       from the first host: DeepSpeed starts every node's ranks over pdsh + passwordless ssh.
#   launch/deepspeed/multi_node.sh --hostfile hosts.txt --node-rank R --logs DIR -- ...
#       run on every host yourself (R = its line in the hostfile, from 0); no ssh needed.
#
# hosts.txt has one line per node, "hostname slots=N" (N = GPUs used on it; # comments).
# Rank 0 runs on the first host (--master-addr overrides the address the others dial).
# Everything after -- goes to `divico train`; each rank writes <logs>/<time>_rank<N>.log on
# its own node. CPU ranks for testing: DS_ACCELERATOR=cpu (slots = ranks per node).
set -euo pipefail

usage="usage: $0 --hostfile FILE [--node-rank R] [--master-addr HOST] --logs DIR -- TRAIN_ARGS"
die() { echo "multi_node.sh: $*" >&2; exit 2; }

hostfile="" node_rank="" master_addr="" logs=""
while (($#)); do
    case $1 in
        --hostfile) hostfile=${2:-}; shift 2 || die "--hostfile needs a value" ;;
        --node-rank) node_rank=${2:-}; shift 2 || die "--node-rank needs a value" ;;
        --master-addr) master_addr=${2:-}; shift 2 || die "--master-addr needs a value" ;;
        --logs) logs=${2:-}; shift 2 || die "--logs needs a value" ;;
        --) shift; break ;;
        *) die "unknown argument '$1'; $usage" ;;
    esac
done
[[ -n $hostfile ]] || die "--hostfile FILE is required; $usage"
[[ -f $hostfile ]] || die "hostfile $hostfile: not found"
[[ -n $logs ]] || die "--logs DIR is required (each rank's log goes there); $usage"
(($#)) || die "no training arguments after --; $usage"
source "$(dirname "$0")/checks.sh"
check_train_args "$@"
command -v deepspeed >/dev/null || die "deepspeed is not on PATH: activate the project's environment"

hosts=() slots=() number=0
while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    line=${line%%#*}
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]] ||
        die "hostfile $hostfile line $number: '$line' is not 'hostname slots=N' (N >= 1)"
    hosts+=("${BASH_REMATCH[1]}") slots+=("${BASH_REMATCH[2]}")
done <"$hostfile"
((${#hosts[@]})) || die "hostfile $hostfile lists no hosts"
[[ $(printf '%s\n' "${hosts[@]}" | sort | uniq -d) == "" ]] || die "hostfile $hostfile lists a host twice"
master_addr=${master_addr:-${hosts[0]}}

if [[ -n $node_rank ]]; then
    [[ $node_rank =~ ^[0-9]+$ ]] && ((node_rank < ${#hosts[@]})) ||
        die "--node-rank $node_rank: the hostfile has ${#hosts[@]} host(s), so it must be 0..$((${#hosts[@]} - 1))"
    if [[ ${DS_ACCELERATOR:-} != cpu ]]; then
        available=$(count_gpus)
        ((${slots[$node_rank]} <= available)) ||
            die "hostfile line for ${hosts[$node_rank]} asks for ${slots[$node_rank]} GPUs; this machine has $available (nvidia-smi -L)"
    fi
    mode=(--no_ssh --node_rank "$node_rank")
else
    command -v pdsh >/dev/null || die "pdsh is not installed: DeepSpeed needs it (and passwordless ssh) to start the other nodes; or run this script on every node with --node-rank R"
    mode=()
fi

mkdir -p "$logs"
exec deepspeed --hostfile "$hostfile" "${mode[@]}" --master_addr "$master_addr" \
    --master_port "${MASTER_PORT:-29500}" --enable_each_rank_log "$logs" --module pipeline.cli train "$@"
