"""Runs at the same time share the cores: a 2-run grid through local_sweep.py, one run at a time against
two at once, the wall time of the whole sweep.

    python benchmarks/parallel_runs.py --data_path ../shared/data [--repeats 3] [--epochs 2]

Three ways, in turn within each repeat (so that the machine's drift hits each alike):
- --workers 1: one run after the other, each with every core's thread;
- --workers 2: both at once, each with its share of the cores (OMP_NUM_THREADS = cores / 2, as
  local_sweep.py sets it);
- --workers 2, every core each (OMP_NUM_THREADS = cores, as torch's default was): the two runs' threads
  crowd each other out.
Prints each way's median time and its ratio to --workers 1. Needs the real MNIST; W&B is off.
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

import yaml

ROOT = Path(__file__).resolve().parent.parent


def sweep_time(folder: Path, workers: int, threads: int | None, data_path: str, epochs: int) -> float:
    sweep = folder / f"sweep-{time.monotonic_ns()}.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "program": str(ROOT / "main.py"),
                "method": "grid",
                "metric": {"name": "val/accuracy", "goal": "maximize"},
                "parameters": {"seed": {"values": [0, 1]}, "epochs": {"value": epochs}},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "local_sweep.py"),
            str(sweep),
            "--workers",
            str(workers),
            "--wandb",
            "disabled",
            "--",
            "--data_path",
            str(Path(data_path).resolve()),
            "--device",
            "cpu",
            "--verbose",
            "0",
        ],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    runs = json.loads(sweep.with_suffix(".state.json").read_text())["runs"]
    if [run["status"] for run in runs] != ["finished", "finished"]:
        sys.exit(f"a run did not finish: see {sweep.with_suffix('.runs')}/*/output.log")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    ways = {
        "--workers 1": (1, None),
        "--workers 2 (a share of the cores each)": (2, None),
        f"--workers 2, OMP_NUM_THREADS={cores} (every core each)": (2, cores),
    }
    times = {way: [] for way in ways}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for way, (workers, threads) in ways.items():
                times[way].append(sweep_time(Path(folder), workers, threads, args.data_path, args.epochs))
                print(f"repeat {repeat + 1}: {way}: {times[way][-1]:.1f} s", file=sys.stderr, flush=True)
    base = statistics.median(times["--workers 1"])
    print(
        f"A 2-run grid ({args.epochs} epochs each, the default model, real MNIST) on {cores} cores, "
        f"median of {args.repeats}:\n"
    )
    print("| how | the whole sweep | / --workers 1 |\n|---|---|---|")
    for way, values in times.items():
        print(f"| {way} | {statistics.median(values):.1f} s | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
