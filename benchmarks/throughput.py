"""What the boilerplate's detectors, metrics and logging cost per training epoch, in fp32 and bf16.

    python benchmarks/throughput.py --data_path ../shared/data [--repeats 5] [--device cpu] [--accuracy] [--compile]

In one process, on the same data, model, optimizer, batch size and device, it times
  (a) a bare hand loop: forward, loss, backward, step, nothing else;
  (b) main.train_epoch handing each step to the bookkeeping (boilerplate.steps), with every statistic
      and detector input on, plus the epoch's W&B log in offline mode;
each in fp32 and in bf16 (forward and loss under torch.autocast, as --precision bf16 runs them), in a
shuffled order in each of `--repeats` rounds, after one warm-up round. It prints the median samples/s
of each, its ratio to the bare loop of the same precision, and its ratio to the bare fp32 loop (the
speed-up). This machine's speed drifts by 10% or more from minute to minute (a shared 2-core VM), so
each ratio is the median of each round's own ratio, not a ratio of medians taken minutes apart. The
target is at least 0.9: an epoch at most about 1.1 times as long as the bare one. A last row, for
reference, is the bare fp32 loop with PyTorch's default (foreach) Adam; the very last, the boilerplate's
fp32 loop with a warm-up and cosine schedule and --accumulate 4, set against the boilerplate's fp32 loop
(its first ratio). With --compile, two rows more: the bare fp32 loop with the model compiled as
--compile yes compiles it, and the boilerplate's fp32 loop with it (set against the bare one compiled:
its first ratio). With --accuracy it also runs the default configuration (python main.py) in each
precision and prints its test accuracy.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import main as experiment
from boilerplate import devices, schedules, watch
from boilerplate.batches import DeviceBatches, hold_out
from boilerplate.steps import Steps
from generate_readme_stub import markdown_table

SCHEDULED = "train_epoch, fp32, cosine + accumulate 4 (first ratio: to train_epoch, fp32)"
COMPILED = "train_epoch, fp32, --compile yes (first ratio: to the bare loop compiled)"
BARE_COMPILED = "bare loop, fp32, compiled"


def bare_epoch(model, optimizer, x, y, batch_size, generator, bf16: bool) -> None:
    order = torch.randperm(len(y), generator=generator).to(y.device)
    for i in range(0, len(y), batch_size):
        batch = order[i : i + batch_size]
        with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if y.device.type == "cuda":
        torch.cuda.synchronize()  # the GPU's work is part of the epoch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--accuracy", action="store_true", help="also train the default run in each precision")
    parser.add_argument("--compile", action="store_true", help="also both fp32 loops with the model compiled")
    args = parser.parse_args(argv)

    opts = experiment.get_parser().parse_args(["--device", args.device, "--data_path", args.data_path])
    description = experiment.load_data(opts)
    data = DeviceBatches(hold_out(description.splits["train"], opts.val_size)[0], torch.device(args.device))
    x, y = data.x, data.y
    sync_every = devices.sync_interval(torch.device(args.device))
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tempfile.mkdtemp())
    import wandb

    run = wandb.init(project="throughput-benchmark")

    kept = {}

    def fresh(fused=True, compiled=None):
        """A new model and optimizer; a compiled loop's (`compiled` names it) are made once and kept: a new
        model each round would be compiled again each round, and past torch's recompile limit not at all."""
        if compiled in kept:
            return kept[compiled]
        torch.manual_seed(0)
        model = experiment.build_model(opts, description).to(args.device)
        if compiled:  # as --compile yes does it
            model.compile(dynamic=False)
            kept[compiled] = model, torch.optim.Adam(model.parameters(), lr=opts.lr, fused=fused or None)
            return kept[compiled]
        return model, torch.optim.Adam(model.parameters(), lr=opts.lr, fused=fused or None)

    # Each loop is set up (fresh model and optimizer) outside the timing, then timed for one epoch.
    def bare(precision="fp32", fused=True, compiled=None):
        model, optimizer = fresh(fused, compiled)
        return lambda: bare_epoch(
            model, optimizer, x, y, opts.batch_size, torch.Generator().manual_seed(0), precision == "bf16"
        )

    def ours(precision="fp32", accumulate=1, schedule="constant", compiled=None):
        model, optimizer = fresh(compiled=compiled)
        per_epoch = -(-len(y) // opts.batch_size // accumulate)
        lr_schedule = schedules.standard(optimizer, schedule, 0.1 if schedule != "constant" else 0.0, 10 * per_epoch)

        def epoch():  # as the run calls it: the bookkeeping made, the experiment's epoch, its statistics
            generator = torch.Generator().manual_seed(0)
            steps = Steps(
                data,
                opts.batch_size,
                generator,
                model,
                optimizer,
                watch.Link(),
                accumulate=accumulate,
                precision=precision,
                sync_every=sync_every,
                predictions_of=experiment.predictions_of,
            )
            experiment.train_epoch(model, optimizer, lr_schedule, steps, opts)
            stats, _ = steps.end()
            run.log(stats)

        return epoch

    loops = {
        "bare loop, fp32": bare,
        "boilerplate train_epoch, fp32": ours,
        "bare loop, bf16": lambda: bare("bf16"),
        "boilerplate train_epoch, bf16": lambda: ours("bf16"),
        "bare loop, fp32, default Adam": lambda: bare(fused=False),
        SCHEDULED: lambda: ours(accumulate=4, schedule="cosine"),
    }
    same = {name: f"bare loop, {'bf16' if 'bf16' in name else 'fp32'}" for name in loops}
    same[SCHEDULED] = "boilerplate train_epoch, fp32"
    if args.compile:  # the warm-up round compiles them
        loops[BARE_COMPILED], loops[COMPILED] = lambda: bare(compiled="bare"), lambda: ours(compiled="ours")
        same[BARE_COMPILED], same[COMPILED] = "bare loop, fp32", BARE_COMPILED
    rates = {name: [] for name in loops}
    shuffle = random.Random(0).shuffle
    for repeat in range(-1, args.repeats):  # round -1 warms up (allocator, caches) and is not counted
        names = list(loops)
        shuffle(names)
        for name in names:
            seconds = timed(loops[name]())
            if repeat >= 0:
                rates[name].append(len(y) / seconds)
    run.finish()

    def ratio(name: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))

    print(
        f"MNIST train split {len(y)} samples, MLP 784-{'-'.join(map(str, opts.hidden))}-10, "
        f"Adam, batch {opts.batch_size}, {args.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} epochs\n"
    )
    print(
        markdown_table(
            [
                "loop",
                "samples/s (median)",
                "min",
                "max",
                "ratio to the bare loop of its precision",
                "ratio to the bare fp32 loop",
            ],
            [
                [
                    name,
                    f"{statistics.median(r):,.0f}",
                    f"{min(r):,.0f}",
                    f"{max(r):,.0f}",
                    f"{ratio(name, same[name]):.3f}",
                    f"{ratio(name, 'bare loop, fp32'):.3f}",
                ]
                for name, r in rates.items()
            ],
        )
    )
    if args.accuracy:
        print()
        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as out:
                experiment.main(
                    [
                        "--data_path",
                        args.data_path,
                        "--device",
                        args.device,
                        "--precision",
                        precision,
                        "--watchdog",
                        "no",
                        "--verbose",
                        "0",
                        "--save",
                        "yes",
                        "--output_path",
                        out,
                        "--checkpoint_every",
                        "0",
                    ]
                )
                [results] = Path(out).glob("*/*/results.json")
                history = json.loads(results.read_text())["history"]
            print(
                f"python main.py --precision {precision}: test accuracy {history[-1]['test/accuracy']:.4f} "
                f"after {len(history)} epochs"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
