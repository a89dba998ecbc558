"""What each piece of train_epoch's per-batch bookkeeping costs, in fp32 or bf16.

    python benchmarks/step_costs.py --data_path ../shared/data [--precision bf16] [--repeats 20]

Each variant trains whole epochs of the default model from the same start, in a shuffled order in
each round after a warm-up round, and is set against the bare loop of the same round: this machine's
speed drifts by 10% or more from minute to minute, and a piece's cost also lands on the steps after
it (forward and backward slow down after the gradient norms at times), so neither a per-step draw
nor a ratio of medians taken minutes apart would show it. The variants add the bookkeeping's pieces
(boilerplate/steps.py) one after another (keep them in step with it; the CPU's, where the host looks at
every batch), and the last is main.train_epoch handing each step to it.
"""

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import main as experiment
from boilerplate import devices, options, steps, wandb_start, watch
from boilerplate.batches import DeviceBatches, hold_out
from generate_readme_stub import markdown_table


def epoch(model, optimizer, data, opts, generator, pieces: int) -> None:
    """One epoch with the first `pieces` of the loop's bookkeeping (4: main.train_epoch itself)."""
    if pieces == 4:
        bookkeeping = steps.Steps(
            data, opts.batch_size, generator, model, optimizer, watch.Link(), precision=opts.precision
        )
        experiment.train_epoch(model, optimizer, None, bookkeeping, opts)
        bookkeeping.end()
        return
    params = list(model.parameters())
    squared_norms = steps.squared_gradient_norms(params)
    rows, outputs, predictions, targets = [], [], [], []
    for x, y in data.batches(opts.batch_size, generator):
        with devices.autocast(opts.precision, x.device):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pieces == -1:
            torch._foreach_norm([p.grad for p in params])
        if pieces >= 1:
            norms = squared_norms()
        if pieces >= 2:
            row = torch.stack([loss.detach(), *norms])
            rows.append(row)
            if not all(map(math.isfinite, row.tolist())):
                break
        if pieces >= 3:
            outputs.append(logits.detach())
            targets.append(y)
            if len(outputs) == steps.OUTPUTS_PER_ARGMAX:
                predictions.append(torch.cat(outputs).argmax(1))
                outputs.clear()
        optimizer.step()


VARIANTS = {
    "bare loop": 0,
    "+ torch's norms (_foreach_norm), for comparison": -1,
    "+ squared gradient norms (steps.squared_gradient_norms)": 1,
    "+ the row of loss and norms, read by the host": 2,
    "+ outputs and targets kept (the loop's whole bookkeeping)": 3,
    "main.train_epoch with boilerplate.steps (+ stop and timeout checks, the epoch's metrics)": 4,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--precision", choices=options.PRECISIONS, default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    wandb_start.disabled_run()  # train_epoch runs as in main.py without W&B: a fork's own wandb.log works
    opts = experiment.get_parser().parse_args(
        ["--device", "cpu", "--data_path", args.data_path, "--precision", args.precision]
    )
    description = experiment.load_data(opts)
    data = DeviceBatches(hold_out(description.splits["train"], opts.val_size)[0], torch.device("cpu"))
    seconds = {name: [] for name in VARIANTS}
    shuffle = random.Random(0).shuffle
    for repeat in range(-1, args.repeats):  # round -1 warms up and is not counted
        names = list(VARIANTS)
        shuffle(names)
        for name in names:
            torch.manual_seed(0)
            model = experiment.build_model(opts, description)
            optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, fused=True)
            start = time.perf_counter()
            epoch(model, optimizer, data, opts, torch.Generator().manual_seed(0), VARIANTS[name])
            if repeat >= 0:
                seconds[name].append(time.perf_counter() - start)
    per_epoch = -(-len(data) // opts.batch_size)
    bare = seconds["bare loop"]
    print(
        f"{args.precision}, batch {opts.batch_size}, {torch.get_num_threads()} threads, {per_epoch} steps an "
        f"epoch, median of {args.repeats} epochs\n"
    )
    print(
        markdown_table(
            ["variant", "step (ms)", "added a step (us)", "ratio to the bare loop"],
            [
                [
                    name,
                    f"{statistics.median(s) / per_epoch * 1e3:.3f}",
                    f"{statistics.median(a - b for a, b in zip(s, bare, strict=True)) / per_epoch * 1e6:.0f}",
                    f"{statistics.median(b / a for a, b in zip(s, bare, strict=True)):.3f}",
                ]
                for name, s in seconds.items()
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
