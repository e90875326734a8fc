#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the launch tests (tests/test_launch*.py).
#
# Installs Debian's slurm-wlm + munge, writes /etc/slurm/slurm.conf and gres.conf, starts
# munged, slurmctld and the slurmd daemons, and waits until every node is idle. Run as
# root. Idempotent: a second run leaves a working cluster alone and restarts the daemons
# only when the config changed.
#
# Partitions:
#   local  this machine's real CPUs and memory (the default); the tests run their jobs here.
#   a100   two emulated 4x A100 nodes (64 CPUs, 4 GPUs, 500 GB each), served by two more
#          slurmd processes on this machine (`slurmd -N`, SlurmdParameters=config_overrides)
#          with stand-in GPU device files (character devices equal to /dev/null). They exist
#          so that `sbatch --test-only` checks a rendered 4x A100 job script with the real
#          scheduler -- gres, tasks and CPUs per node, memory, node count, time limit --
#          instead of a copy with the GPU lines edited away. (Nodes that are down or never
#          registered make every --test-only fail, so they must be up.) Submit no real jobs
#          there: they would run on this machine's cores.
set -euo pipefail

[[ $(id -u) == 0 ]] || { echo "slurm-up.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
fi

# munge: the package creates the key; munged runs as root here, --force accepts the
# container's directory permissions.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { echo "slurm-up.sh: munged did not start" >&2; exit 1; }
fi

host=$(hostname -s)
fake_nodes=(a100-01 a100-02)
fake_gpus=/var/lib/divico-ci-fake-gpus
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm "$fake_gpus"
for node in "$host" "${fake_nodes[@]}"; do mkdir -p "/var/spool/slurmd/$node"; done
for i in 0 1 2 3; do [[ -c $fake_gpus/gpu$i ]] || mknod "$fake_gpus/gpu$i" c 1 3; done

# slurmd -C reports this machine as slurmd sees it; a NodeName line promising more would
# get the node drained.
node_line=$(slurmd -C | head -n1)
gres_conf="NodeName=a100-[01-02] Name=gpu Type=a100 File=$fake_gpus/gpu[0-3]"
slurm_conf=$(cat <<EOF
# Written by .ci/slurm-up.sh: a test cluster on ${host}.
ClusterName=divico-ci
SlurmctldHost=${host}
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# The emulated nodes register with their slurm.conf shape, not this machine's hardware.
SlurmdParameters=config_overrides
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
# Finished jobs stay visible to scontrol for an hour (there is no accounting database).
MinJobAge=3600
GresTypes=gpu
${node_line} State=UNKNOWN
NodeName=a100-01 NodeAddr=127.0.0.1 Port=6901 CPUs=64 RealMemory=500000 Gres=gpu:a100:4 State=UNKNOWN
NodeName=a100-02 NodeAddr=127.0.0.1 Port=6902 CPUs=64 RealMemory=500000 Gres=gpu:a100:4 State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP
PartitionName=a100 Nodes=a100-[01-02] MaxTime=7-00:00:00 State=UP
EOF
)

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$slurm_conf" ||
      "$(cat /etc/slurm/gres.conf 2>/dev/null)" != "$gres_conf" ]]; then
    echo "$slurm_conf" >/etc/slurm/slurm.conf
    echo "$gres_conf" >/etc/slurm/gres.conf
    # A changed node list needs fresh daemons; stop the ones this script started.
    for pidfile in /run/slurmd-*.pid /run/slurmctld.pid; do
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        fi
    done
fi

running /run/slurmctld.pid || slurmctld
running "/run/slurmd-$host.pid" || slurmd
for node in "${fake_nodes[@]}"; do running "/run/slurmd-$node.pid" || slurmd -N "$node"; done

all_idle() {
    local states
    states=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ -n $states ]] && ! grep -qvE '^(idle|mixed|allocated)$' <<<"$states"
}
for _ in $(seq 60); do
    if all_idle; then sinfo; exit 0; fi
    sleep 1
done
sinfo -N -l >&2 || true
echo "slurm-up.sh: not every node became idle; see /var/log/slurm/slurmctld.log and slurmd-*.log" >&2
exit 1
