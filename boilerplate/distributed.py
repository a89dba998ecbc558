"""One run over many processes: `torchrun --nproc_per_node N main.py ...` starts N training processes
(ranks), each with a shard of every batch, and torch's DistributedDataParallel averages their gradients.
Everything else here makes the N processes one run: the same seed, the same starting state, the same
statistics and metrics on every rank, and the same decision to stop, after the same batch.

Rank 0 alone owns the run: its folder, results.json, checkpoints and the W&B run. The others train and
agree, and write nothing. Without torchrun's environment (RANK, WORLD_SIZE) nothing here does anything.
"""

import contextlib
import datetime
import io
import math
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .errors import StartError, UsageError, described

if TYPE_CHECKING:
    from . import watch

TIMEOUT: datetime.timedelta | None = None  # how long a collective waits for the other ranks
# Before the run begins the other ranks wait for rank 0's start: a person at W&B's login prompt, W&B's start
# (wandb_start.limit(), 100 s). --epoch_timeout bounds an epoch, not these: they wait as torch would, in a
# group of their own (gloo, whatever the training's backend), as long as its default timeout.
START: "dist.ProcessGroup | None" = None
START_TIMEOUT = datetime.timedelta(minutes=30)
SIGNAL_WAIT = 0.1  # seconds between looks at a wait (Python hears a signal only between them)
DEADLINE = [math.inf]  # the epoch's, on the perf_counter clock (--epoch_timeout): Steps sets it


def world() -> int:
    """How many processes train this run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def launched() -> bool:
    """Whether torchrun (or srun with its variables) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restarts() -> tuple[int, int]:
    """How many times torchrun has started the job's processes again after one failed (its --max-restarts),
    and how many times it may."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def device(chosen: str) -> str:
    """Under torchrun on CUDA, each rank its own device: LOCAL_RANK's."""
    if launched() and chosen == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return chosen


def start(device: torch.device, timeout_minutes: float) -> None:
    """Joins the job's process group (NCCL on CUDA, gloo on the CPU). A rank that hangs makes the others'
    next collective fail after `timeout_minutes` (--epoch_timeout, else torch's own 30)."""
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    global TIMEOUT, START
    TIMEOUT = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else START_TIMEOUT
    try:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        START = dist.new_group(backend="gloo", timeout=START_TIMEOUT)
    except (RuntimeError, ValueError) as e:
        # torch's own fault (pytorch/pytorch#135712, #167288): after a restart the ranks may read the addresses
        # the processes before them left in torchrun's store, and connect to nothing
        stale = restarts()[0] and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        advice = (
            "; restarted by torchrun, the job may need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set for it" if stale else ""
        )
        raise StartError(f"could not join the other processes of the job ({described(e)}){advice}") from None


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PeerLost(Exception):
    """A collective failed: another rank of the job died (Crashed), or did not answer within the process
    group's timeout (Timeout): `hung`."""

    def __init__(self, message: str, hung: bool):
        super().__init__(message)
        self.hung = hung


@contextlib.contextmanager
def collective(timeout: datetime.timedelta | None = None) -> Iterator[None]:
    """Where a collective runs: its failure (a RuntimeError from gloo or NCCL, after so long) is PeerLost.
    `timeout`: its group's, when not the training's (TIMEOUT)."""
    start = time.monotonic()
    try:
        yield
    except RuntimeError as e:
        raise lost(e, start, timeout or TIMEOUT) from None


def lost(e: BaseException, start: float, timeout: datetime.timedelta | None = None) -> PeerLost:
    """A rank that hangs makes the others wait: past the group's timeout, or past the epoch's own deadline
    (its guard then kills the hung rank, and the others see it die), a peer lost is a hang."""
    late = time.monotonic() - start >= timeout.total_seconds() if timeout else False
    hung = late or time.perf_counter() > DEADLINE[0]
    what = "did not answer in time" if hung else "died"
    return PeerLost(f"another process of the job {what} ({described(e)})", hung)


def same(value: object) -> object:
    """Rank 0's value, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    with collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(code: torch.Tensor) -> torch.Tensor:
    """The largest of each rank's `code` (a device tensor of small integers), on every rank, in place."""
    if dist.is_initialized():
        with collective():
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return code


def total(values: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks, on every rank, in place."""
    if dist.is_initialized():
        with collective():
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gathered(values: torch.Tensor) -> torch.Tensor:
    """Every rank's `values` (of any length: rows of any shape, a class each or a score each class), joined
    in rank order, on every rank."""
    if not dist.is_initialized():
        return values
    lengths = [torch.zeros((), dtype=torch.int64, device=values.device) for _ in range(world())]
    with collective():
        dist.all_gather(lengths, torch.tensor(len(values), device=values.device))
    longest = int(max(lengths))
    padded = values.new_zeros((longest, *values.shape[1:]))
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in lengths]
    with collective():
        dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths, strict=True)])


def bounds(size: int, part: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """The share of `size` items that rank `part` of `parts` takes: contiguous, the shares differing by
    at most one, in rank order (so that the shares joined are the whole, in order)."""
    part, parts = rank() if part is None else part, world() if parts is None else parts
    return size * part // parts, size * (part + 1) // parts


def gradients_lost() -> PeerLost | None:
    """How the gradients' all-reduce in backward() failed, if it did (see wrapped)."""
    return LOST[0] if LOST else None


LOST: list[PeerLost] = []  # the gradients' all-reduce that failed, as PeerLost (DDP raises it as a RuntimeError)


def wait_for_rank_0(link: "watch.Link | None" = None) -> None:
    """Every rank waits here until rank 0 comes, for as long as its start takes (START). `link` (watch.Link)
    tells the guard, which times the run once it has started, that the wait is no hang."""
    if dist.is_initialized():
        if link is not None:
            link.send("waiting", seconds=START_TIMEOUT.total_seconds())
        with collective(START_TIMEOUT):
            waiting = dist.barrier(group=START, async_op=True)
            while not waiting.is_completed():  # in slices: a stop signal is heard meanwhile, not once rank 0 comes
                time.sleep(SIGNAL_WAIT)
            waiting.wait()


class Word:
    """Rank 0's word to the other ranks, said once, before training: the seed to train with (rank 0's, a
    resumed run's), or the exit status to end with, when rank 0 ended the run before it began (it had
    ended already, its folder was busy). `tell` gives every rank the word rank 0 told."""

    def __init__(self):
        self.said = not dist.is_initialized()

    def tell(self, word: dict) -> dict:
        if self.said:
            return word
        self.said = True
        return same(word if rank() == 0 else None)


def first(tag: str | None) -> str | None:
    """The first rank's tag of those that have one (rank 0's first), on every rank."""
    if not dist.is_initialized():
        return tag
    tags = [None] * world()
    with collective():
        dist.all_gather_object(tags, tag)
    return next((t for t in tags if t is not None), None)


def restored(state: dict, stateful: dict) -> tuple[int, list, list]:
    """Rank 0's snapshot (checkpoints.snapshot) put back into every rank's `stateful`: sent as bytes
    torch.save wrote, loaded as a checkpoint is (onto the CPU; each piece then copies its tensors onto
    its own device)."""
    from . import checkpoints

    buffer = io.BytesIO()
    if rank() == 0:
        torch.save(state, buffer)
    sent = same(buffer.getvalue())
    state = torch.load(io.BytesIO(sent), map_location=checkpoints.HOST, weights_only=True)
    return checkpoints.restore_all(state, stateful)


def wrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model as the training loop sees it: under torchrun, in DistributedDataParallel."""
    if not dist.is_initialized():
        return model
    device = next(model.parameters()).device
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def all_reduce(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP's own all-reduce (allreduce_hook: the mean over the ranks), with its failure kept as
        PeerLost: backward() raises it as a RuntimeError like any other."""
        start = time.monotonic()

        def seen(future: torch.futures.Future) -> torch.Tensor:
            try:
                return future.value()
            except RuntimeError as e:
                LOST.append(lost(e, start))
                raise

        return default_hooks.allreduce_hook(state, bucket).then(seen)

    ddp.register_comm_hook(None, all_reduce)
    return ddp


def check_shares(samples: int, batch_size: int, splits: dict[str, int]) -> None:
    """Every rank must have a sample in every batch (an empty share has no mean loss) and in every split."""
    ranks, last = world(), samples % batch_size
    if ranks > 1 and (batch_size < ranks or 0 < last < ranks):
        raise UsageError(
            f"argument --batch_size: {batch_size} leaves a rank with no sample in a batch ({ranks} ranks share "
            f"each batch; the {samples} training samples end with a batch of {last or batch_size}); use a batch "
            f"of at least {ranks} whose last batch has at least {ranks} samples too"
        )
    if small := [f"{split} ({n})" for split, n in splits.items() if n < ranks]:
        raise UsageError(f"the {', '.join(small)} split has fewer samples than the {ranks} ranks that share it")
