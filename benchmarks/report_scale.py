"""How long report.py takes over many run folders: the target is 10,000 in under 10 s.

    python benchmarks/report_scale.py --data_path ../shared/data [--runs 10000] [--epochs 10]

One real run (main.py, --save yes, on the data given) is copied into `--runs` run folders: 100 groups
(a hyper-parameter changed in each) of replicates, each run's figures perturbed so that no two are
alike, its history as long as a real run's of `--epochs` epochs. Then `python report.py FOLDER` runs
as a user runs it (a fresh process: the imports counted too), twice: the second with the page cache
warm. Wall-clock and CPU seconds are printed. The figures are in
docs/performance.md.
"""

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="write the run folders here, and leave them (for a profiler)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = args.keep or folder
        seed_out = Path(folder) / "seed"
        subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "--data_path", args.data_path, "--epochs", "1", "--save", "yes"]
            + ["--output_path", str(seed_out), "--verbose", "0", "--hidden", "16"],
            check=True,
        )
        [results_path] = seed_out.glob("*/*/results.json")
        results, config = (
            json.loads(results_path.read_text()),
            json.loads((results_path.parent / "config.json").read_text()),
        )
        row = results["history"][0]
        rng = random.Random(0)
        out = Path(folder) / "out"
        for i in range(args.runs):
            group, seed = f"group-{i % 100:03d}", i // 100
            history = [
                {k: v * (1 + rng.uniform(-0.01, 0.01)) if isinstance(v, float) else v for k, v in row.items()}
                | {"epoch": epoch}
                for epoch in range(1, args.epochs + 1)
            ]
            best = {f"best/{k}": v for k, v in history[-1].items() if k.startswith(("val/", "test/"))}
            run = out / group / f"run{i:05d}"
            run.mkdir(parents=True)
            run_results = results | {
                "group": group,
                "seed": seed,
                "history": history,
                "best": best | {"best/epoch": args.epochs},
            }
            (run / "results.json").write_text(json.dumps(run_results))
            (run / "config.json").write_text(
                json.dumps(config | {"group": group, "seed": seed, "lr": 1e-3 * (1 + i % 100)})
            )
        shutil.rmtree(seed_out)
        times, cpu = [], []
        for _ in range(2):
            start, used = time.perf_counter(), children_cpu()
            done = subprocess.run([sys.executable, str(ROOT / "report.py"), str(out)], capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            cpu.append(children_cpu() - used)
            assert done.returncode == 0, done.stderr
        print(done.stdout.splitlines()[-1])
        print(
            f"{args.runs} run folders ({args.epochs} epochs each): {times[1]:.2f} s, {cpu[1]:.2f} s of CPU "
            f"(cold cache: {times[0]:.2f} s, {cpu[0]:.2f} s of CPU)"
        )


def children_cpu() -> float:
    """CPU seconds of this process's finished children: a shared machine's load lengthens the wall clock's
    figure, not this one."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
