"""The batch loop makes the host wait for the device only where main.py marks it (the step handed to the
bookkeeping, steps.keep).

Two witnesses, one question: which line of train_epoch was running when the host read the device?
- On any machine: every host read that torch routes through a TorchFunctionMode (item, tolist,
  bool(), float(), .cpu(), .numpy(), and the ops whose output size depends on values, which wait for
  the device on a GPU). Runs here, on the CPU, so a new host read in the loop fails the suite anywhere.
- On a CUDA GPU: CUDA's own sync debug mode, which also sees syncs inside torch's C++ code.
"""

import inspect
import json
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import demo
import main
from boilerplate import devices, options
from boilerplate.batches import DeviceBatches
from conftest import a_disabled_run, in_memory, one_epoch, parse

pytestmark = pytest.mark.usefixtures("in_a_run")  # a fork's wandb.log in train_epoch works, as in main.py

BATCHES = 125  # with SYNC_EVERY = 50, two marked looks in the loop (after batches 50 and 100)

# Tensor methods and functions that hand a value to the host, or must wait for one to size their output.
HOST_READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "equal",
    "allclose",
    "is_nonzero",
    "repeat_interleave",
}


def loop_lines() -> tuple[int, int, int]:
    """First and last line of train_epoch's batch loop, and the line of its marked sync: the call that hands
    each step to the bookkeeping, whose look at the device is each batch's on the CPU, one every
    devices.SYNC_EVERY on an accelerator."""
    source, first = inspect.getsourcelines(main.train_epoch)
    start = first + next(i for i, line in enumerate(source) if line.lstrip().startswith("for x, y in steps"))
    end = first + len(source)
    check = first + next(i for i, line in enumerate(source) if "# sync point" in line)
    return start, end, check


def train_epoch_line() -> int | None:
    """The line of train_epoch on the current stack: the caller of whatever synchronises (None: outside it,
    as the epoch's statistics are read at its end)."""
    lines = [f.lineno for f in traceback.extract_stack() if f.filename == main.__file__ and f.name == "train_epoch"]
    return lines[-1] if lines else None


def epoch_setup(data_path, device: str, optimizer: str, precision: str = "fp32") -> tuple:
    """one_epoch's arguments: the tiny MNIST through torchvision's loader, dropout and clipping on."""
    torch.manual_seed(0)
    args = parse(*demo.data_and_model(data_path), *demo.RANDOM_LAYERS, "--batch_size", "4", "--grad_clipping", "1")
    args.precision = precision
    data = main.load_data(args)
    batches = DeviceBatches(in_memory(data.splits["train"], 4 * BATCHES), torch.device(device))
    model = main.build_model(args, data).to(device)
    optim_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    optim = optim_class(model.parameters(), lr=1e-3, fused=True)
    return model, optim, batches, args


def in_loop(lines: list[int]) -> list[int]:
    start, end, _ = loop_lines()
    return [line for line in lines if line is not None and start <= line < end]


class HostReads(TorchFunctionMode):
    """Records the line of train_epoch behind every host read that passes through torch's Python API."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_mask = name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if name in HOST_READS or bool_mask:
            self.lines.append(train_epoch_line())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", options.PRECISIONS)  # autocast must add no host read
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("sync_every", [1, devices.SYNC_EVERY], ids=["cpu-every-batch", "accelerator-every-50"])
def test_batch_loop_reads_the_host_only_at_the_marked_look(tiny_data, optimizer, sync_every, precision):
    args = epoch_setup(tiny_data, "cpu", optimizer, precision)
    with HostReads() as reads:
        stats, tag = one_epoch(*args, sync_every=sync_every)
    assert tag is None and stats["train/batches"] == BATCHES
    _, _, check = loop_lines()
    assert in_loop(reads.lines) == [check] * (BATCHES // sync_every), in_loop(reads.lines)
    assert len(reads.lines) > len(in_loop(reads.lines)), "no read seen at the epoch's end: the test sees nothing"


def test_the_witness_sees_an_unmarked_read(tiny_data):
    """A read the loop does not make, made inside it (a callback of the optimizer's step), is caught."""
    model, optim, *rest = epoch_setup(tiny_data, "cpu", "sgd")
    optim.register_step_post_hook(lambda optimizer, args, kwargs: float(next(model.parameters()).detach().sum()))
    with HostReads() as reads:
        one_epoch(model, optim, *rest, sync_every=devices.SYNC_EVERY)
    assert len(in_loop(reads.lines)) == BATCHES + BATCHES // devices.SYNC_EVERY


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("precision", options.PRECISIONS)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_on_cuda_the_batch_loop_syncs_once_per_interval_and_nowhere_else(tiny_data, optimizer, precision):
    args = epoch_setup(tiny_data, "cuda", optimizer, precision)
    one_epoch(*args, sync_every=devices.SYNC_EVERY)  # warm-up: lazy CUDA initialisation
    torch.cuda.synchronize()
    syncs = []

    def record(message, *args, **kwargs):
        if "synchronizing" in str(message):
            syncs.append(train_epoch_line())

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # called within the synchronising call, so the stack is the caller's
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stats, tag = one_epoch(*args, sync_every=devices.SYNC_EVERY)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tag is None and stats["train/batches"] == BATCHES
    _, _, check = loop_lines()
    assert in_loop(syncs) == [check] * (BATCHES // devices.SYNC_EVERY), in_loop(syncs)
    assert len(syncs) > len(in_loop(syncs)), "no sync seen at the epoch's end either: the test cannot see syncs"


def witness_one_rank(rank: int, data_path: str, rendezvous: str, out: str) -> None:
    """One rank of a 2-rank job (gloo, in a process torch.multiprocessing started): one epoch through
    DistributedDataParallel, looking as often as on an accelerator, under the host-read witness."""
    import torch.distributed as dist

    from boilerplate import distributed

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model, optim, batches, args = epoch_setup(data_path, "cpu", "sgd")
        with a_disabled_run(), HostReads() as reads:  # as in_a_run: a fork's wandb.log in the loop works
            stats, tag = one_epoch(distributed.wrapped(model), optim, batches, args, sync_every=devices.SYNC_EVERY)
        found = {"in_loop": in_loop(reads.lines), "all": len(reads.lines), "batches": stats["train/batches"]}
        Path(out, f"{rank}.json").write_text(json.dumps({**found, "tag": tag, "check": loop_lines()[2]}))
    finally:
        dist.destroy_process_group()


def test_under_torchrun_each_rank_reads_the_host_once_a_look(tiny_data, tmp_path):
    """The ranks' agreement (on a stop, a non-finite step) adds no host read to the loop: each rank reads
    the device once every devices.SYNC_EVERY batches, at the marked line, as one process does."""
    torch.multiprocessing.spawn(
        witness_one_rank, args=(str(tiny_data), str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2
    )
    for rank in (0, 1):
        found = json.loads((tmp_path / f"{rank}.json").read_text())
        assert found["tag"] is None and found["batches"] == BATCHES
        assert found["in_loop"] == [found["check"]] * (BATCHES // devices.SYNC_EVERY), found
        assert found["all"] > len(found["in_loop"]), "no read seen at the epoch's end: the test sees nothing"
