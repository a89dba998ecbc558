"""The per-batch bookkeeping of one training epoch, behind one accumulator: `Steps` deals the epoch's
batches (ending it early at a stop or past its deadline), keeps each step's loss, gradient norms and
predictions on the device, looks at them from the host only as often as the device allows, and turns
them into the epoch's statistics at its end, with one read of the device. Under torchrun each rank keeps its
share of each batch, the ranks agree at each look on whether to stop (so that all stop after the same batch),
and the epoch's statistics are the whole batches', the same on every rank."""

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

import utils

from . import devices, distributed
from .batches import DeviceBatches, LoaderBatches
from .metrics import metric_values
from .watch import Link

OUTPUTS_PER_ARGMAX = 32  # batches of the model's outputs kept for one predictions_of call
# What can stop an epoch early, numbered for the ranks to agree on one (the largest): 0 is nothing.
STOPS = [None, *dict.fromkeys(tag() for tag in utils.STOP_SIGNALS.values()), utils.TIMEOUT()]


def squared_gradient_norms(params: list[nn.Parameter]) -> Callable[[], list[torch.Tensor]]:
    """A function that gives each parameter's squared gradient norm, never in fp16 (whose square
    overflows at 256). fp32 and wider on the CPU as dot products, which read memory faster than torch's
    norm (44 against 58 us a step for the demo's 2.7 MB of gradients); else by torch's fused kernel
    for them all (one launch on an accelerator)."""
    if all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params):
        return lambda: [torch.dot(g, g) for g in (p.grad.reshape(-1) for p in params)]
    wide = torch.float32 if any(p.dtype == torch.float16 for p in params) else None

    def fused():  # private, kept for speed: one launch for every norm; pinned by test_squared_gradient_norms
        norms = torch._foreach_norm([p.grad for p in params], dtype=wide)
        return torch._foreach_mul(norms, norms)

    return fused


class Steps:
    """One epoch's batches and what the detectors need of them. The training loop iterates over it for its
    batches, scales each batch's loss by its `share` of the optimizer step (scaled()), calls keep() after each
    backward pass (False: a loss or gradient was not finite: take no step), steps the optimizer where
    `stepping` says, and end() gives the epoch's statistics and the tag that stopped it early, if any.

    `accumulate` is the batches whose gradients add up to one optimizer step (the epoch's last group may
    be shorter, and steps too); `stop` says when the run is stopped; `sync_every` is the batches between
    the host's looks at the device (devices.sync_interval)."""

    def __init__(
        self,
        batches: DeviceBatches | LoaderBatches,
        batch_size: int,
        generator: torch.Generator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stop: Link,
        *,
        epoch: int = 1,
        accumulate: int = 1,
        precision: str = "fp32",
        deadline: float = math.inf,
        sync_every: int = 1,
        predictions_of: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits.argmax(1),
        progress: bool = False,
    ) -> None:
        self.start, self.epoch = time.perf_counter(), epoch  # the epoch's number, from 1
        self.data, self.batch_size, self.generator, self.stop = batches, batch_size, generator, stop
        self.precision, self.deadline, self.sync_every = precision, deadline, sync_every
        self.span = deadline - self.start  # how long the epoch may take: stop.past gives it again after a suspension
        distributed.DEADLINE[0] = deadline
        self.predictions_of, self.progress = predictions_of, progress
        self.params = [p for p in model.parameters() if p.requires_grad]  # a fork may freeze some
        # Under torchrun (the model in DistributedDataParallel), a batch whose step waits for more batches
        # (--accumulate) keeps its gradients on its rank (DDP's no_sync): the ranks all-reduce once a step.
        self.model = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self.squared_norms = squared_gradient_norms(self.params)
        self.rows, self.outputs, self.predictions, self.targets = [], [], [], []  # device tensors, read at the end
        self.sizes, self.classes, self.tag = [], 0, None
        # Each batch's share of its optimizer step's samples, and whether the step is taken after it: the mean
        # loss over a group of batches is then the loss of one batch as large as the group, whatever its size.
        # Under torchrun, DistributedDataParallel averages the ranks' gradients: each rank's share is then
        # its own samples' share of the step's, times the number of ranks.
        n, self.ranks = len(batches), distributed.world()
        self.global_sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
        groups = [self.global_sizes[i : i + accumulate] for i in range(0, len(self.global_sizes), accumulate)]
        mine = [end - start for start, end in map(distributed.bounds, self.global_sizes)]
        plan, at = [], 0
        for group in groups:
            plan += [(self.ranks * mine[at + i] / sum(group), i == len(group) - 1) for i in range(len(group))]
            at += len(group)
        self.plan = plan
        self.share, self.stepping, self.agreed = 1.0, True, None
        # On an accelerator, 1 from the first non-finite loss or gradient norm on. Between the host's looks,
        # the fused optimizers read it as GradScaler's found_inf and skip their step on the device themselves.
        # A private attribute (GradScaler's way to talk to the fused optimizers), kept for speed: the public way
        # waits for the device every batch. test_training's test_the_private_apis_kept_for_speed pins it.
        # float32 whatever torch's default dtype: GradScaler's check (flag) takes no other.
        self.nonfinite = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self.one = torch.ones_like(self.nonfinite)  # the check's unscale factor: nothing to unscale
        optimizer.found_inf = self.nonfinite if sync_every > 1 else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        total = -(-len(self.data) // self.batch_size)
        sharded = {"shard": True} if self.ranks > 1 else {}  # a fork's own batches need not know of torchrun
        batches = self.data.batches(self.batch_size, self.generator, **sharded)
        dealt = tqdm(batches, total=total, leave=False, disable=not self.progress, desc="batches")
        for (x, y), plan in zip(dealt, self.plan, strict=False):
            self.share, self.stepping = plan
            if self.ranks > 1:  # what the ranks agreed on at the last look (keep)
                if self.agreed:
                    self.tag = self.agreed
                    return
            elif self.stop.requested:
                self.tag = self.stop.tag
                return
            elif self.stop.past(self.deadline, self.span):
                self.tag = utils.TIMEOUT()
                return
            with self.model.no_sync() if self.model and not self.stepping else contextlib.nullcontext():
                yield x, y  # the training loop's forward and backward run here

    def local_stop(self) -> int:
        """This rank's reason to stop, as a number of STOPS."""
        if self.stop.requested:
            return STOPS.index(self.stop.tag)
        return STOPS.index(utils.TIMEOUT()) if self.stop.past(self.deadline, self.span) else 0

    def autocast(self) -> torch.autocast:
        """Where the forward pass and the loss run (devices.autocast): bf16 with --precision bf16."""
        return devices.autocast(self.precision, self.nonfinite.device)

    def keep(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> bool:
        """Keeps the batch's loss, the model's outputs and the labels, and where an optimizer step follows,
        each parameter's squared gradient norm (the true one, before clipping). False when the loss or a
        gradient is not finite: never step with it. The host looks at the device here, every `sync_every`
        batches (a sync point)."""
        row = torch.stack([loss.detach(), *self.squared_norms()]) if self.stepping else loss.detach().reshape(1)
        self.rows.append(row)
        self.sizes.append(labels.shape[0])
        self.outputs.append(logits.detach())
        self.targets.append(labels)
        self.classes = logits.shape[1]  # the model's outputs: one a class
        if len(self.outputs) == OUTPUTS_PER_ARGMAX:  # one call for many batches: 10 us a batch less on the CPU
            self.predictions.append(self.predictions_of(torch.cat(self.outputs)))
            self.outputs.clear()
        # On the CPU the host reads the row: a microsecond, less than the flag's check (flag) would cost.
        if self.ranks > 1:
            return self.agree(row)
        if self.sync_every == 1:
            return all(map(math.isfinite, row.tolist()))  # sync point, every batch (on the CPU)
        self.flag(row)
        return not (len(self.rows) % self.sync_every == 0 and self.nonfinite.item())  # sync point, every sync_every

    def flag(self, row: torch.Tensor) -> None:
        """Sets the non-finite flag to 1 if the row holds a NaN or an infinity, on the device. GradScaler's
        own check, private, kept for speed: one launch on an accelerator, where isfinite().all() and an or take
        seven. test_the_private_apis_kept_for_speed pins it."""
        torch._amp_foreach_non_finite_check_and_unscale_([row], self.nonfinite, self.one)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The batch's loss times its share of the optimizer step, to take the gradients of: the loss itself
        when the batch is the whole step (two launches fewer on an accelerator than multiplying by 1)."""
        return loss if self.share == 1 else loss * self.share

    def agree(self, row: torch.Tensor) -> bool:
        """keep() under torchrun: a non-finite loss on any rank is every rank's (the gradients are the same
        on all), and so is a stop; the ranks agree on both at each look, and act on them together."""
        self.flag(row)
        if len(self.rows) % self.sync_every:
            distributed.agree(self.nonfinite)  # on an accelerator, queued: the host does not wait for it
            return True
        here = torch.tensor(float(self.local_stop()), device=self.nonfinite.device)
        codes = distributed.agree(torch.stack([self.nonfinite, here]))
        self.nonfinite.copy_(codes[0])
        codes = codes.tolist()  # sync point, every sync_every batches: the ranks' collective, read
        self.agreed = STOPS[int(codes[1])]
        return not codes[0]

    def grad_norm(self) -> torch.Tensor:
        """The last step's total gradient norm, before clipping: a device tensor, for clip_grads_with_norm_."""
        return self.rows[-1][1:].sum().sqrt()

    def end(self) -> tuple[dict | None, str | None]:
        """The epoch's statistics (None if no optimizer step was taken) and the error tag that stopped it
        early, if any."""
        if self.outputs:
            self.predictions.append(self.predictions_of(torch.cat(self.outputs)))
        # Sync point, once per epoch: the epoch's statistics, read to the host together. In float64 the
        # total gradient norm is finite whenever each parameter's is, as the look in the loop judged it.
        flat = torch.cat(self.rows).double() if self.rows else torch.zeros(0, dtype=torch.float64)
        if self.ranks > 1:  # each batch's loss is the mean over its shares (the gradients are the same on all)
            starts = torch.tensor([0, *(len(row) for row in self.rows)]).cumsum(0)[:-1].to(flat.device)
            local = torch.tensor(self.sizes, dtype=torch.float64, device=flat.device)
            whole = torch.tensor(self.global_sizes[: len(self.rows)], dtype=torch.float64, device=flat.device)
            flat[starts] = distributed.total(flat[starts] * local) / whole
            self.sizes = self.global_sizes[: len(self.rows)]
        flat = flat.cpu().tolist()
        losses, norms, at = [], [], 0
        for row in self.rows:  # a row's length is its shape: known on the host
            losses.append(flat[at])
            norms.append(math.sqrt(sum(flat[at + 1 : at + len(row)])) if len(row) > 1 else None)
            at += len(row)
        tag = self.tag
        if bad := utils.nonfinite_step(losses, norms):  # the batches after the bad one took no step: not the epoch's
            tag, losses, norms = bad[1], losses[: bad[0] + 1], norms[: bad[0] + 1]
        elif None in norms[-1:]:  # stopped inside a group of batches: the group took no step, it is not the epoch's
            stepped = max((i + 1 for i, norm in enumerate(norms) if norm is not None), default=0)
            losses, norms = losses[:stepped], norms[:stepped]
        if not losses:
            return None, tag
        targets = torch.cat(self.targets[: len(losses)])
        predictions = distributed.gathered(torch.cat(self.predictions)[: len(targets)])
        targets = distributed.gathered(targets)
        seen = len(targets)
        stats = metric_values(predictions, targets, "train", self.classes)
        mean, std, low, high = utils.describe([norm for norm in norms if norm is not None])
        stats.update(
            {
                "train/loss": sum(v * s for v, s in zip(losses, self.sizes, strict=False)) / seen,
                "train/grad_norm_mean": mean,
                "train/grad_norm_std": std,
                "train/grad_norm_min": low,
                "train/grad_norm_max": high,
                "train/batches": len(losses),
                "train/time": time.perf_counter() - self.start,
            }
        )
        return stats, tag
