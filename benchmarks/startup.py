"""How long main.py takes to start: to print --help, and from launch to its first training batch.

    python benchmarks/startup.py --data_path ../shared/data [--repeats 3]

Each repeat launches a fresh interpreter that imports main.py and calls main.main() as
`python main.py` would, for one epoch, standalone and with W&B in offline mode:
- by default (--watchdog yes) training runs in a second, spawned process; the first batch is when
  that process reports its first epoch (the report carries the moment, on the machine's clock);
- with --watchdog no, timers around main.py's own load_mnist and start_wandb break the start-up
  down, and the first call of train_epoch is the first batch (it records the moment and returns
  at once, which main() takes as a run stopped before its first batch).
It prints the median of each figure, in seconds since launch.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(argv: list[str]) -> None:
    """Runs in the launched interpreter: time main.py's phases, print them as JSON."""
    launch = float(os.environ["LAUNCHED_AT"])
    sys.path.insert(0, str(ROOT))
    phases = {}
    import main as experiment
    import watch

    phases["imports"] = time.monotonic() - launch

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = time.monotonic() - start
        return wrapper

    def first_batch(*args, **kwargs):
        phases["first batch"] = time.monotonic() - launch
        return None, experiment.utils.USER_ABORT()  # a stop before the first batch: main() ends the run

    handle = watch.Record.handle

    def watched(record, report):
        if report[0] == "epoch" and report[1] == 1:
            phases["first batch"] = report[2] - launch
        return handle(record, report)

    experiment.load_mnist = timed("load_mnist", experiment.load_mnist)
    watch.start_wandb = timed("start_wandb", watch.start_wandb)
    if "--watchdog=no" in argv:
        experiment.train_epoch = first_batch
    else:
        watch.Record.handle = watched
    experiment.main(argv)
    print(json.dumps(phases))


def launch(args: list[str], env: dict) -> tuple[float, str]:
    """Run `python ARGS`; the launch moment goes to the child in $LAUNCHED_AT."""
    start = time.monotonic()  # the machine's clock (on Linux and macOS): the launched processes read it too
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "LAUNCHED_AT": repr(start)})
    if done.returncode not in (0, 1):  # 1: the run stopped before its first batch, as intended
        sys.exit(f"python {' '.join(args)} failed:\n{done.stderr}")
    return time.monotonic() - start, done.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    env = {**os.environ, "WANDB_SILENT": "true"}
    helps = [launch(["main.py", "--help"], env)[0] for _ in range(args.repeats)]
    print(f"python main.py --help: median {statistics.median(helps):.2f} s "
          f"(min {min(helps):.2f}, max {max(helps):.2f}, {args.repeats} launches)\n")

    main_args = ["--data_path", str(Path(args.data_path).resolve()), "--epochs", "1", "--verbose", "0",
                 "--checkpoint_every", "0"]
    with tempfile.TemporaryDirectory() as wandb_dir:
        offline = {**env, "WANDB_MODE": "offline", "WANDB_DIR": wandb_dir}
        wandb = ["--wandb_project", "startup-benchmark"]
        modes = {"standalone, in one process": (main_args + ["--watchdog=no"], env),
                 "W&B offline, in one process": (main_args + wandb + ["--watchdog=no"], offline),
                 "standalone, watched (default)": (main_args, env),
                 "W&B offline, watched (default)": (main_args + wandb, offline)}
        results = {}
        for mode, (margs, menv) in modes.items():
            runs = [json.loads(launch([__file__, "--child", json.dumps(margs)], menv)[1].splitlines()[-1])
                    for _ in range(args.repeats)]
            for r in runs:
                if "load_mnist" in r:
                    r["other"] = r["first batch"] - sum(r.get(k, 0.0) for k in ("imports", "load_mnist",
                                                                                   "start_wandb"))
            results[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows = {"imports": "launch to main.py imported (Python, torch, torcheval, torchvision, tqdm)",
            "load_mnist": "load_mnist: MNIST read, normalised, on the device",
            "start_wandb": "start_wandb: import wandb and wandb.init",
            "other": "the rest: parse, validation split, baselines, model, optimizer",
            "first batch": "**launch to the first training batch**"}
    print("| phase | " + " | ".join(modes) + " |\n|---|" + "---|" * len(modes))
    for key, label in rows.items():
        print(f"| {label} | " + " | ".join(f"{results[m][key]:.2f} s" if key in results[m] else "" for m in modes)
              + " |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
