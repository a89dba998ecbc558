"""On a CUDA GPU, the batch loop syncs with the host only where main.py marks it. Skipped without one."""

import inspect
import traceback
import warnings

import pytest
import torch

import main
import utils

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def loop_lines() -> tuple[int, int, int]:
    """First and last line of train_epoch's batch loop, and the line of its marked per-interval sync."""
    source, first = inspect.getsourcelines(main.train_epoch)
    start = first + next(i for i, line in enumerate(source) if line.lstrip().startswith("for i in "))
    end = first + next(i for i, line in enumerate(source) if line.lstrip().startswith("if not losses"))
    check = first + next(i for i, line in enumerate(source) if "nonfinite.item()" in line)
    return start, end, check


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batch_loop_syncs_once_per_interval_and_nowhere_else(optimizer):
    torch.manual_seed(0)
    x, y = torch.randn(1000, 784, device="cuda"), torch.randint(0, 10, (1000,), device="cuda")
    opts = vars(utils.get_arg_parser().parse_args(["--batch_size", "8", "--grad_clipping", "1"]))
    model = main.build_model((64,), 0.1).cuda()
    optim_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    optim = optim_class(model.parameters(), lr=1e-3, fused=True)
    args = (model, optim, x, y, opts, torch.Generator().manual_seed(0), main.StopRequest())
    main.train_epoch(*args, sync_every=main.SYNC_EVERY, verbose=0)  # warm-up: lazy CUDA initialisation

    torch.cuda.synchronize()
    syncs = []  # the line of train_epoch that was running at each sync, wherever the sync happened below it

    def record(message, *args, **kwargs):
        if "synchronizing" in str(message):
            syncs.append([f.lineno for f in traceback.extract_stack()
                          if f.filename == main.__file__ and f.name == "train_epoch"][-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # called within the synchronising call, so the stack is the caller's
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stats, tag = main.train_epoch(*args, sync_every=main.SYNC_EVERY, verbose=0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tag is None and stats["train/batches"] == 125
    start, end, check = loop_lines()
    in_loop = [line for line in syncs if start <= line < end]
    assert in_loop == [check] * (125 // main.SYNC_EVERY), in_loop  # the marked non-finite look, every 50 batches
    assert len(syncs) > len(in_loop), "no sync seen at the epoch's end either: the test cannot see syncs"
