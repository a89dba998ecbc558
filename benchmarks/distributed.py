"""One run on 2 processes against 1, on this machine's CPUs: samples/s of the training epochs.

    python benchmarks/distributed.py --data_path ../shared/data [--rounds 3] [--epochs 2] [--cores 2]

The same run (the default MLP on MNIST, global batch 128, fp32) as (a) `python main.py` with one
process of --cores threads and (b) `torchrun --nproc_per_node 2 main.py`, 2 ranks of --cores/2 threads
each (gloo), alternated in each of --rounds rounds, because this machine's speed drifts. Each run's
epochs after the first are timed from results.json (train/time), and each round's ratio is (b)/(a); it
prints the median samples/s of each and the median of the rounds' ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def samples_per_second(ranks: int, threads: int, args: argparse.Namespace, out: Path) -> float:
    """The median samples/s of the run's epochs after its first."""
    flags = ["--data_path", args.data_path, "--epochs", str(args.epochs), "--device", "cpu", "--verbose", "0"]
    flags += ["--save", "yes", "--output_path", str(out), "--seed", "0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*(launcher if ranks > 1 else [sys.executable]), str(ROOT / "main.py"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    [path] = out.glob("*/*/results.json")
    results = json.loads(path.read_text())
    size = results["constants"]["data/train_size"]
    return statistics.median(size / row["train/time"] for row in results["history"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    alone, job, ratios = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            one = samples_per_second(1, args.cores, args, Path(folder, f"one{round_}"))
            two = samples_per_second(2, args.cores // 2, args, Path(folder, f"two{round_}"))
            alone.append(one)
            job.append(two)
            ratios.append(two / one)
    print(f"MNIST MLP 784-512-512-10, Adam, global batch 128, fp32, CPU, {args.cores} cores, {args.rounds} rounds\n")
    print("| run | samples/s (median) | min | max | ratio to 1 process |")
    print("|---|---|---|---|---|")
    for name, values, ratio in (
        (f"1 process x {args.cores} threads", alone, 1.0),
        (f"torchrun, 2 ranks x {args.cores // 2} thread(s) (gloo)", job, statistics.median(ratios)),
    ):
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f} | {max(values):,.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
