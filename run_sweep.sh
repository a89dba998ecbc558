#!/usr/bin/env bash
# Start N W&B agents for one sweep on this machine; Ctrl+C stops them cleanly.
#
#   ./run_sweep.sh N SWEEP_ID [wandb agent options, e.g. --count 5]
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

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N SWEEP_ID [wandb agent options]   (N: how many agents, at least 1)" >&2
    exit 2
fi
n=$1 sweep=$2
shift 2
cd "$(dirname "$0")"

# This project's sweeps are sparse by design: a pruned combination (see prune_hyperparameters) ends
# within seconds with exit status 1. W&B's agent takes quick failures for a broken setup and quits:
# 3 failures in its first 60 s ("flapping"), or at least WANDB_AGENT_MAX_INITIAL_FAILURES (5) failures
# with no more successes than failures. Unless you set them yourself, those checks are relaxed here.
export WANDB_AGENT_DISABLE_FLAPPING="${WANDB_AGENT_DISABLE_FLAPPING:-true}"
export WANDB_AGENT_MAX_INITIAL_FAILURES="${WANDB_AGENT_MAX_INITIAL_FAILURES:-1000}"

set -m  # job control: each background agent gets a process group of its own
pids=()
for ((i = 0; i < n; i++)); do
    wandb agent --forward-signals "$@" "$sweep" &
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
