#!/usr/bin/env bash
# Start N W&B agents for one sweep on this machine; Ctrl+C stops them cleanly.
#
#   ./run_sweep.sh N SWEEP_ID [--gpus 0,1,...] [wandb agent options, e.g. --count 5]
#
# --gpus pins agent i to the i-th GPU of the list (CUDA_VISIBLE_DEVICES, as W&B documents for parallel
# agents; the list is reused from its start when N is larger).
#
# Each agent asks W&B's server for a configuration and runs `python main.py --key=value ...`, one
# run after another. W&B's agent starts every run in a process group of its own, so a terminal's
# Ctrl+C never reaches a run by itself: without help the run is killed at the second Ctrl+C and
# never tagged User abort. Here the agents are started with --forward-signals (they pass what they
# receive on to their run), each in a process group of its own (so that this script alone decides
# what they receive), and this script passes each Ctrl+C on exactly once:
#   first Ctrl+C:  every running experiment stops at its next batch with the tag User abort (Failed
#                  in W&B, history kept); each agent starts no new run and exits once its run ended;
#   second Ctrl+C: the agents terminate their runs at once and quit.
# A SIGTERM to this script (a scheduler's) acts as Ctrl+C. Exit status: 130 after Ctrl+C, 2 for bad
# arguments, else the highest of the agents' exit statuses.
set -u

usage="usage: $0 N SWEEP_ID [--gpus 0,1,...] [wandb agent options]   (N: how many agents, at least 1)"
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage" >&2
    exit 2
fi
n=$1 sweep=$2
shift 2
gpus=()
if [[ ${1:-} == --gpus ]]; then
    if [[ ! ${2:-} =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        echo "$usage" >&2
        exit 2
    fi
    IFS=, read -r -a gpus <<< "$2"
    shift 2
fi
cd "$(dirname "$0")"
# The agents' runs share the cores this script may use (nproc counts those): torch's threads, one share
# each, unless OMP_NUM_THREADS is set already. Two runs with every core's threads each crowd each other
# out: on 2 cores, 5.5 times slower than with one thread each.
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    share=$(( $(nproc) / n ))
    export OMP_NUM_THREADS=$(( share > 0 ? share : 1 ))
fi
# W&B's agent's flapping checks stay on: a pruned combination exits 0 (it did what was asked), so
# only a broken setup (every run failing at once) stops the agents, as W&B intends.

set -m  # job control: each background agent gets a process group of its own
pids=()
for ((i = 0; i < n; i++)); do
    if ((${#gpus[@]})); then
        CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]} wandb agent --forward-signals "$@" "$sweep" &
    else
        wandb agent --forward-signals "$@" "$sweep" &
    fi
    pids+=($!)
done

interrupts=0
interrupt() {
    interrupts=$((interrupts + 1))
    if ((interrupts == 1)); then
        echo "run_sweep.sh: stopping; each running experiment ends at its next batch with User abort." \
             "Ctrl+C again to end everything at once." >&2
    else
        echo "run_sweep.sh: ending every run now." >&2
    fi
    kill -INT "${pids[@]}" 2>/dev/null
}
trap interrupt INT TERM

status=0
for pid in "${pids[@]}"; do
    # `wait` returns early when a trapped signal arrives: wait again until the agent has really exited.
    while true; do
        wait "$pid"
        code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    ((code > status)) && status=$code
done
((interrupts > 0)) && exit 130
exit "$status"
