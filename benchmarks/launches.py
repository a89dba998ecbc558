"""How many operations a training step dispatches, the bare loop's against the boilerplate's, counted on the
CPU: on a GPU each one that computes is a kernel launch, and a small model's step there is launch-bound
(docs/performance.md, "On a GPU"), so the difference is what the bookkeeping costs there.

    python benchmarks/launches.py --data_path ../shared/data

Each loop trains 64 batches of the default model, in fp32 and bf16, with the host looking at every batch
(the CPU's way) and every devices.SYNC_EVERY batches (an accelerator's: the non-finite flag on the device).
Counted by torch's dispatcher (a TorchDispatchMode: private, and only here, to count); the last column leaves
out what launches nothing (views, detaches, the profiler's marks). One difference from a GPU: there the
gradient norms are one fused norm and its squares (steps.squared_gradient_norms), here a dot product a
parameter (6 for the demo's MLP).
"""

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from throughput import bare_epoch
from torch.utils._python_dispatch import TorchDispatchMode

import main as experiment
from boilerplate import devices, wandb_start, watch
from boilerplate.batches import DeviceBatches, hold_out
from boilerplate.steps import Steps

BATCHES = 64
# What launches nothing on a GPU: views, detaches, the profiler's marks (optimizer.step's).
FREE = {"aten.view", "aten.t", "aten.detach", "aten._unsafe_view", "aten.slice", "aten.select", "aten.expand"}
FREE |= {"profiler._record_function_enter_new", "profiler._record_function_exit"}


class Counted(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--ops", action="store_true", help="also list each loop's operations")
    args = parser.parse_args(argv)
    wandb_start.disabled_run()  # train_epoch runs as in main.py without W&B
    rows = []
    for precision in ("fp32", "bf16"):
        opts = experiment.get_parser().parse_args(["--data_path", args.data_path, "--precision", precision])
        description = experiment.load_data(opts)
        train = hold_out(description.splits["train"], opts.val_size)[0]
        some = torch.utils.data.TensorDataset(*(t[: BATCHES * opts.batch_size] for t in train.tensors))
        data = DeviceBatches(some, torch.device("cpu"))
        loops = {"bare loop": None, "boilerplate, host looks every batch": 1}
        loops[f"boilerplate, host looks every {devices.SYNC_EVERY} batches"] = devices.SYNC_EVERY
        for name, sync_every in loops.items():
            torch.manual_seed(0)
            model = experiment.build_model(opts, description)
            optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, fused=True)
            with Counted() as counted:
                if sync_every is None:
                    bare_epoch(
                        model, optimizer, data.x, data.y, opts.batch_size, torch.Generator(), precision == "bf16"
                    )
                else:
                    steps = Steps(
                        data,
                        opts.batch_size,
                        torch.Generator(),
                        model,
                        optimizer,
                        watch.Link(),
                        precision=precision,
                        sync_every=sync_every,
                        predictions_of=experiment.predictions_of,
                    )
                    experiment.train_epoch(model, optimizer, None, steps, opts)
            computing = sum(n for op, n in counted.calls.items() if op not in FREE)
            rows.append((f"{name}, {precision}", sum(counted.calls.values()) / BATCHES, computing / BATCHES))
            if args.ops:
                print(
                    f"{name}, {precision}:",
                    ", ".join(f"{op} {n / BATCHES:.2f}" for op, n in counted.calls.most_common()),
                )
    print("| loop | operations a step | of which compute (one kernel launch or more each on a GPU) |\n|---|---|---|")
    for name, total, computing in rows:
        print(f"| {name} | {total:.1f} | {computing:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
