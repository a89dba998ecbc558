"""What the boilerplate's detectors, metrics and logging cost per training epoch.

    python benchmarks/throughput.py --data_path ../shared/data [--repeats 5] [--device cpu]

In one process, on the same data, model, optimizer, batch size and device, it times
  (a) a bare hand loop: forward, loss, backward, step, nothing else;
  (b) experiment.train_epoch with every statistic and detector input on, plus the epoch's W&B log in
      offline mode;
in a shuffled order in each of `--repeats` rounds, after one warm-up round. It prints the median
samples/s of each and the ratio b/a. This machine's speed drifts by 10% or more from minute to minute
(a shared 2-core VM), so the ratio is the median of each round's own ratio, not a ratio of medians
taken minutes apart. The target is at least 0.9: an epoch at most about 1.1 times as long as the
bare one. A third row, for reference, is the bare loop with PyTorch's default (foreach) Adam.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import main as experiment  # noqa: E402
import utils  # noqa: E402


def bare_epoch(model, optimizer, x, y, batch_size, generator) -> None:
    order = torch.randperm(len(y), generator=generator).to(y.device)
    for i in range(0, len(y), batch_size):
        batch = order[i:i + batch_size]
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
    args = parser.parse_args(argv)

    opts = vars(utils.get_arg_parser().parse_args(["--device", args.device, "--verbose", "0"]))
    data = experiment.load_mnist(args.data_path, torch.device(args.device))
    x, y = experiment.hold_out(*data["train"], opts["val_size"])[0]
    sync_every = experiment.sync_interval(torch.device(args.device))
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tempfile.mkdtemp())
    import wandb

    run = wandb.init(project="throughput-benchmark")

    def fresh(fused=True):
        torch.manual_seed(0)
        model = experiment.build_model(opts["hidden"], opts["dropout"]).to(args.device)
        return model, torch.optim.Adam(model.parameters(), lr=opts["lr"], fused=fused or None)

    # Each loop is set up (fresh model and optimizer) outside the timing, then timed for one epoch.
    def bare(fused=True):
        model, optimizer = fresh(fused)
        return lambda: bare_epoch(model, optimizer, x, y, opts["batch_size"], torch.Generator().manual_seed(0))

    def ours():
        model, optimizer = fresh()

        def epoch():
            stats, _ = experiment.train_epoch(model, optimizer, x, y, opts, torch.Generator().manual_seed(0),
                                              experiment.StopRequest(), sync_every, verbose=0)
            run.log(stats)

        return epoch

    loops = {"bare loop": bare, "boilerplate train_epoch": ours, "bare loop, default Adam": lambda: bare(False)}
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

    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(r, rates["bare loop"])) for name, r in rates.items()}
    print(f"MNIST train split {len(y)} samples, MLP 784-{'-'.join(map(str, opts['hidden']))}-10, "
          f"Adam, batch {opts['batch_size']}, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} epochs\n")
    print(utils.markdown_table(
        ["loop", "samples/s (median)", "min", "max", "ratio to bare loop (median of rounds)"],
        [[name, f"{m:,.0f}", f"{min(rates[name]):,.0f}", f"{max(rates[name]):,.0f}", f"{ratios[name]:.3f}"]
         for name, m in medians.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
