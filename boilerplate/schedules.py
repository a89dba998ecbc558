"""The learning-rate schedules of --lr_schedule and --warmup, from torch.optim.lr_scheduler: over the
run's optimizer steps, stepped after each of them, kept in the checkpoint by its state_dict."""

import torch
from torch.optim import lr_scheduler


def standard(
    optimizer: torch.optim.Optimizer, kind: str, warmup_share: float, steps: int
) -> lr_scheduler.LRScheduler | None:
    """`kind` from the rate the optimizer was made with, after a linear warm-up over `warmup_share` of the
    `steps` (lr/N, 2 lr/N, ..., lr over N steps; fewer than 2: none). None for a constant rate without
    warm-up: nothing to step. cosine and linear decay to 0 at the last step; step multiplies by 0.1 at
    half and at three quarters of the steps after the warm-up."""
    warmup = round(warmup_share * steps)
    warmup = warmup if warmup >= 2 else 0
    rest = max(1, steps - warmup)
    if kind == "constant" and not warmup:
        return None
    after = {
        "constant": lambda: lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0),
        "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest),
        "linear": lambda: lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=rest),
        "step": lambda: lr_scheduler.MultiStepLR(optimizer, [rest // 2, rest * 3 // 4], gamma=0.1),
    }[kind]()  # every one of options.SCHEDULES, the choices of --lr_schedule
    if not warmup:
        return after
    ramp = lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, total_iters=warmup - 1)
    return lr_scheduler.SequentialLR(optimizer, [ramp, after], milestones=[warmup])
