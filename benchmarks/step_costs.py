"""What each piece of train_epoch's per-step bookkeeping costs, step by step, in fp32 or bf16.

    python benchmarks/step_costs.py --data_path ../shared/data [--precision bf16] [--steps 6000]

One model and optimizer train on; before each step one variant of the bookkeeping is drawn at
random, and the step (batch, forward, loss, backward, bookkeeping, optimizer step) is timed. Each
variant's median step time is set against the bare step's: the machine's drift, which moves whole
epochs by 10% or more here, hits every variant alike. The variants restate main.train_epoch's lines
(keep them in step with it): nothing; the gradient norm alone; the whole bookkeeping as the loop does
it on the CPU (norm, kept loss, norm and predictions, the non-finite flag and the host's look).
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import main as experiment  # noqa: E402
import utils  # noqa: E402


def grad_norm(params):
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))


def bare(params, loss, logits, y, kept, nonfinite) -> bool:
    return False


def norm_only(params, loss, logits, y, kept, nonfinite) -> bool:
    kept.append(grad_norm(params))
    return False


def whole(params, loss, logits, y, kept, nonfinite) -> bool:
    norm = grad_norm(params)
    kept += [loss.detach(), norm, logits.detach().argmax(1), y]
    nonfinite.logical_or_((loss + norm).isfinite().logical_not_())
    return nonfinite.item()


VARIANTS = {"bare step": bare, "+ gradient norm": norm_only, "+ the loop's whole bookkeeping": whole}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--precision", choices=utils.PRECISIONS, default="bf16")
    parser.add_argument("--steps", type=int, default=6000)
    args = parser.parse_args(argv)
    opts = vars(utils.get_arg_parser().parse_args(["--device", "cpu", "--data_path", args.data_path,
                                                   "--precision", args.precision]))
    description = experiment.load_data(opts)
    x, y = description.splits["train"].tensors
    torch.manual_seed(0)
    model = experiment.build_model(opts, description)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts["lr"], fused=True)
    params, bs = list(model.parameters()), opts["batch_size"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    times, draw, kept, nonfinite = {name: [] for name in VARIANTS}, random.Random(0), [], torch.zeros(())
    for step in range(args.steps):
        name = draw.choice(list(VARIANTS))
        start = time.perf_counter()
        batch = order[(step * bs) % (len(y) - bs):][:bs]
        with experiment.mixed_precision(opts, x.device):
            logits = model(x[batch])
            loss = F.cross_entropy(logits, y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        VARIANTS[name](params, loss, logits, y[batch], kept, nonfinite)
        optimizer.step()
        if step >= 200:  # after a warm-up
            times[name].append(time.perf_counter() - start)
        if len(kept) > 4000:
            kept.clear()
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["bare step"]
    print(f"{args.precision}, batch {bs}, {torch.get_num_threads()} threads, {args.steps} steps\n")
    print(utils.markdown_table(["variant", "median step (ms)", "added (us)", "ratio to the bare step"],
                               [[name, f"{m * 1e3:.3f}", f"{(m - base) * 1e6:.0f}", f"{base / m:.3f}"]
                                for name, m in medians.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
