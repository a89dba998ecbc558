"""Stands in for `wandb agent --forward-signals SWEEP_ID` in tests, where no W&B server can be reached.

The real agent asks W&B's server for each run's parameters; nothing else in it needs the server. This
stand-in takes them from JSON files in $STANDIN_QUEUE instead (one command per file, claimed by an
atomic rename, so that several agents never take the same one) and does the rest with W&B's own code,
as wandb_agent.Agent._command_run does: the parameter file and the environment the agent sets
(WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH), the command line built by W&B's sweep utilities
(`python main.py --key=value ...`), and wandb_agent.AgentProcess, which starts the run in a process
group of its own and forwards the signals the agent receives to it. Shutdown follows Agent.run's
tiers: first signal, start no new run and wait for the running one; second, terminate it; third, kill.
"""

import json
import os
import sys
import time
from pathlib import Path

from wandb import wandb_agent
from wandb.sdk.lib import config_util

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import local_sweep


def claim(queue: Path) -> dict | None:
    for path in sorted(queue.glob("*.json")):
        try:
            os.rename(path, path.with_suffix(".taken"))
        except FileNotFoundError:  # another agent took it first
            continue
        return json.loads(path.with_suffix(".taken").read_text())
    return None


def start(command: dict, sweep_id: str) -> wandb_agent.AgentProcess:
    param_path = os.path.join(
        os.environ.get("WANDB_DIR", ""), "wandb", f"sweep-{sweep_id}", f"config-{command['run_id']}.yaml"
    )
    config_util.save_config_file_from_dict(param_path, command["args"])
    env = {
        **os.environ,
        "WANDB_SWEEP_ID": sweep_id,
        "WANDB_RUN_ID": command["run_id"],
        "WANDB_SWEEP_PARAM_PATH": param_path,
    }
    # W&B's command template filled in by W&B's own code, with the agent's interpreter, `python`
    params = {k: v["value"] for k, v in command["args"].items()}
    argv = local_sweep.agent_argv(params, command["program"], interpreter="python")
    return wandb_agent.AgentProcess(command=argv, env=env, forward_signals=True)


def main() -> int:
    assert sys.argv[1] == "agent" and "--forward-signals" in sys.argv, sys.argv
    sweep_id, queue = sys.argv[-1], Path(os.environ["STANDIN_QUEUE"])
    process, tier = None, 0
    while True:
        try:
            if tier == 0:
                while True:
                    if process is None or process.poll() is not None:
                        command = claim(queue)
                        if command is None:  # the sweep is done
                            return 0
                        process = start(command, sweep_id)
                    time.sleep(0.2)
            if process is not None and tier == 2:
                process.terminate()
            if process is not None and tier >= 3:
                process.kill()
            return process.wait() if process is not None else 0
        except (KeyboardInterrupt, wandb_agent.ShutdownSignal):
            tier += 1
            print(f"agent stand-in: signal {tier}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
