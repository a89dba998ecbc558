"""How long main.py takes to start: to print --help, and from launch to its first training batch.

    python benchmarks/startup.py --data_path ../shared/data [--repeats 5]

Each repeat launches `python main.py --verbose 2` as a user would, watched by the guard (the
default) and with --watchdog no, standalone and with W&B in offline mode. The first batch is when
the batch bar appears on the screen (tqdm draws it as the loop over batches begins); the run is then
stopped. Launches alternate between the modes, so that the machine's load moves them alike. It
prints the median of each mode and the ratio watched / --watchdog no.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_batch(args: list[str], env: dict) -> float:
    """Seconds from launching `python main.py ARGS` to its batch bar."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    seen = b""
    try:
        while b"batches:" not in seen:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                sys.exit(f"python main.py {' '.join(args)} ended before its first batch:\n{seen.decode()}")
            seen += chunk
        return time.monotonic() - start
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    env = {**os.environ, "WANDB_SILENT": "true"}
    helps = []
    for _ in range(args.repeats):
        start = time.monotonic()
        subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, check=True)
        helps.append(time.monotonic() - start)
    print(
        f"python main.py --help: median {statistics.median(helps):.2f} s "
        f"(min {min(helps):.2f}, max {max(helps):.2f}, {args.repeats} launches)\n"
    )

    run = ["--data_path", str(Path(args.data_path).resolve()), "--epochs", "1", "--verbose", "2", "--save", "no"]
    with tempfile.TemporaryDirectory() as wandb_dir:
        offline = {**env, "WANDB_MODE": "offline", "WANDB_DIR": wandb_dir}
        wandb = ["--wandb_project", "startup-benchmark"]
        modes = {
            ("standalone", "watched (default)"): (run, env),
            ("standalone", "--watchdog no"): (run + ["--watchdog", "no"], env),
            ("W&B offline", "watched (default)"): (run + wandb, offline),
            ("W&B offline", "--watchdog no"): (run + wandb + ["--watchdog", "no"], offline),
        }
        times = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, (margs, menv) in modes.items():
                times[mode].append(first_batch(margs, menv))
    print(
        "| launch to the first training batch | watched (default) | --watchdog no | watched / --watchdog no |\n"
        "|---|---|---|---|"
    )
    for logging in ("standalone", "W&B offline"):
        watched, alone = (statistics.median(times[(logging, how)]) for how in ("watched (default)", "--watchdog no"))
        print(f"| {logging} | {watched:.2f} s | {alone:.2f} s | {watched / alone:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
