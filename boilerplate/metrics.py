"""Every metric of the metrics table (utils.METRICS) on a split's predictions, by the torcheval function
the table names; and the guessing baselines of each split, from its labels."""

import logging
import warnings

import torch

import utils

with warnings.catch_warnings():  # torcheval 0.0.7 still decorates with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from torcheval.metrics import functional as torcheval_functional

# Macro F1 leaves a class absent from a split out, as the baselines do (utils.most_probable_f1);
# torcheval says so on the root logger each time, e.g. for every epoch cut short by a stop.
logging.getLogger().addFilter(lambda record: "Some classes do not exist in the target" not in record.getMessage())


def metric_values(predictions: torch.Tensor, targets: torch.Tensor, split: str, classes: int) -> dict[str, float]:
    """Keys like `val/accuracy`, one a metric of the table."""
    values = [
        getattr(torcheval_functional, m.torcheval)(predictions, targets, num_classes=classes, **dict(m.options))
        for m in utils.METRICS
    ]
    values = torch.stack(values).tolist()  # sync point: once per split and epoch
    return {f"{split}/{m.name}": v for m, v in zip(utils.METRICS, values, strict=True)}


def baselines(labels: dict[str, torch.Tensor], classes: int) -> dict[str, float]:
    """What guessing scores on each split (utils.baselines), from its labels, counted once."""
    return utils.baselines({split: torch.bincount(y, minlength=classes).tolist() for split, y in labels.items()})
