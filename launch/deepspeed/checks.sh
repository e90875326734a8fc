# Checks shared by single_node.sh and multi_node.sh (sourced; they define die()).

# Every --config file named in the training arguments exists.
check_train_args() {
    local previous="" argument
    for argument in "$@"; do
        if [[ $previous == --config ]]; then
            [[ -f $argument ]] || die "--config $argument: not found (relative to $(pwd))"
        fi
        previous=$argument
    done
    [[ " $* " == *" --config "* ]] || die "the training arguments name no --config FILE"
}

count_gpus() {
    command -v nvidia-smi >/dev/null ||
        die "nvidia-smi not found, so no NVIDIA GPU here; for CPU ranks set DS_ACCELERATOR=cpu"
    nvidia-smi -L | grep -c '^GPU ' || true
}

# A free TCP port for the rendezvous, so several runs can share a machine.
free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
