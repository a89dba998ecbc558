"""Where a bare training step's time goes, in fp32 and in bf16: why bf16's speed-up depends on the machine.

    python benchmarks/precision_parts.py --data_path ../shared/data [--repeats 300]

On batches of MNIST and the default model, it times (milliseconds per step, the median of 5
interleaved rounds, each after a warm-up) the bare loop's pieces in each precision: the forward and
loss (under torch.autocast for bf16), the backward, the fused Adam step, and, on their own, the
step's matrix products with the shapes they have in it (forward, input gradient and weight gradient
of each layer). What is left once the matrix products are taken out (casts, element-wise ops, loss,
dispatch) is the part that bf16 does not make faster. A machine whose matrix units are fast but whose
per-op work is not gets much less than 2x from bf16.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import main as experiment
from boilerplate.batches import DeviceBatches, hold_out
from generate_readme_stub import markdown_table


def per_call(fn, repeats: int) -> float:
    for _ in range(max(10, repeats // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="../shared/data")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    opts = experiment.get_parser().parse_args(["--device", "cpu", "--data_path", args.data_path])
    description = experiment.load_data(opts)
    data = DeviceBatches(hold_out(description.splits["train"], opts.val_size)[0], torch.device("cpu"))
    batches = [(data.x[i : i + opts.batch_size], data.y[i : i + opts.batch_size]) for i in range(0, 128 * 400, 128)]

    def parts(bf16: bool) -> dict:
        # A fresh model each time: a thousand steps on, its gradients shrink and its timings drift.
        torch.manual_seed(0)
        model = experiment.build_model(opts, description)
        optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, fused=True)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        at = iter(range(10**9))  # each call takes the next batch
        dtype = torch.bfloat16 if bf16 else torch.float32

        def forward():
            x, y = batches[next(at) % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return F.cross_entropy(model(x), y)

        def forward_backward():
            optimizer.zero_grad(set_to_none=True)
            forward().backward()

        def step():
            forward_backward()
            optimizer.step()

        # The step's matrix products alone, in the shapes and dtype autocast gives them.
        mats = []
        for layer in linears:
            w = layer.weight.detach().to(dtype)
            a = torch.randn(opts.batch_size, w.shape[1], dtype=dtype)
            g = torch.randn(opts.batch_size, w.shape[0], dtype=dtype)
            mats.append((a, w, g))

        def matmuls():
            for a, w, g in mats:
                a @ w.t(), g @ w, g.t() @ a

        whole, fwd, fwd_bwd, mm = (per_call(f, args.repeats) for f in (step, forward, forward_backward, matmuls))
        return {"step": whole, "forward": fwd, "backward": fwd_bwd - fwd, "optimizer": whole - fwd_bwd, "mm": mm}

    rounds = {"fp32": [], "bf16": []}
    for _ in range(5):
        for name in rounds:
            rounds[name].append(parts(name == "bf16"))
    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
    print(
        f"batches of {opts.batch_size}, MLP 784-{'-'.join(map(str, opts.hidden))}-10, fused Adam, cpu, "
        f"{torch.get_num_threads()} threads, ms per step (median of 5 rounds)\n"
    )
    rows = [
        [
            name,
            *(f"{m[k]:.3f}" for k in ("step", "forward", "backward", "optimizer", "mm")),
            f"{m['step'] - m['mm']:.3f}",
        ]
        for name, m in median.items()
    ]
    ratio = {k: median["fp32"][k] / median["bf16"][k] for k in median["fp32"]}
    rest = (median["fp32"]["step"] - median["fp32"]["mm"]) / (median["bf16"]["step"] - median["bf16"]["mm"])
    rows.append(
        ["fp32 / bf16", *(f"{ratio[k]:.2f}" for k in ("step", "forward", "backward", "optimizer", "mm")), f"{rest:.2f}"]
    )
    print(
        markdown_table(["precision", "step", "forward", "backward", "optimizer", "matrix products", "the rest"], rows)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
