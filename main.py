"""Train an MLP on MNIST with a hand-written loop; group and tag the run in Weights & Biases.

    python main.py --data_path ../shared/data                      # standalone, summary on screen
    python main.py --data_path ../shared/data --save yes           # + model and results under outputs/
    python main.py --data_path ../shared/data --wandb_project mnist
    WANDB_MODE=offline python main.py --wandb_project mnist        # upload later with `wandb sync`
    wandb agent SWEEP_ID                                           # runs `python main.py --key=value ...`
    python main.py --data_path ../shared/data --resume yes         # go on from where a stopped run was
    %run main.py --data_path ../shared/data                        # in a Jupyter notebook: trains in the kernel

This file is the experiment, top to bottom: its hyper-parameters, data, model, loss, optimizer, one
training epoch, evaluation. The machinery is the `boilerplate` package: the guard (`python main.py`
starts itself again under a small process that ends the run properly if training crashes or hangs;
--watchdog no, or a debugger, trains without it), the run record (W&B, the run folder, results,
checkpoints, resume), the batches and the per-batch bookkeeping the detectors read. wandb.init, log
and finish happen in the process that trains, so your own wandb.log lands in the run.
Every option: `python main.py --help`. Exit status: 0 when the run ended without an error tag (or
declined to train a pruned combination), 1 when it ended with one (or could not start), 2 for an
invalid command line, 130, 129, 131 or 143 when Ctrl+C, a closed terminal (SIGHUP), SIGQUIT or SIGTERM
(or a scheduler's SIGUSR1 or SIGUSR2) stopped it before the run began.
"""

import signal

if __name__ == "__main__":  # first of all: stop signals wait until this process can act on them (the guard's)
    signal.pthread_sigmask(
        signal.SIG_BLOCK,
        (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT),
    )

import math
from argparse import Namespace
from pathlib import Path

from boilerplate import options, watch
from boilerplate.options import Number, Widths

# ==============================================================================================
# HYPER-PARAMETERS: they change results, so they name the W&B group (runs differing only by --seed
# share one). Add one here and read it as args.name; `python generate_readme_stub.py --tables`
# updates the docs. The run adds its own (--epochs, --batch_size, --precision, --val_size) and the
# housekeeping options (boilerplate/options.py); utils.prune_hyperparameters knows the redundant ones.


def add_hyperparameters(hyper) -> None:
    hyper.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer")
    hyper.add_argument("--lr", type=Number(float, min=0, min_open=True), default=1e-3, help="learning rate")
    hyper.add_argument(
        "--momentum",
        type=Number(float, min=0, max=1, max_open=True),
        default=0.0,
        help="SGD momentum (irrelevant with adam)",
    )
    hyper.add_argument("--weight_decay", type=Number(float, min=0), default=0.0, help="L2 penalty")
    hyper.add_argument(
        "--hidden", type=Widths(), default="512,512", help="hidden layer widths of the MLP, comma-separated"
    )
    hyper.add_argument(
        "--dropout",
        type=Number(float, min=0, max=1, max_open=True),
        default=0.0,
        help="dropout probability after each hidden layer",
    )
    hyper.add_argument(
        "--grad_clipping",
        type=Number(float, min=0),
        default=0.0,
        help="max total gradient norm (norm clipping), 0 = off",
    )


def get_parser() -> options.Parser:
    return options.parser(__doc__.splitlines()[0], add_hyperparameters)


if __name__ == "__main__":  # parse before torch loads (2 s): --help and usage errors answer at once
    LINK = watch.begin(__file__, get_parser())  # becomes the guard, or returns in the training process

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.datasets import MNIST

from boilerplate import devices, schedules, session
from boilerplate.batches import Data
from boilerplate.errors import StartError, described
from boilerplate.steps import Steps

# ==============================================================================================
# DATA: the one place that knows it is MNIST. load_data loads the splits and says what they are;
# the model's sizes, the baselines, the checks and W&B's config read that description. Data without
# a test split of its own holds one out: splits["train"], splits["test"] = hold_out(splits["train"], n)
# (boilerplate.batches). Any map-style Dataset works; tensors that fit are sliced on the device.

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_data(args: Namespace) -> Data:
    """MNIST from --data_path (downloaded there when missing), normalised, as tensors."""
    raw = Path(args.data_path, "MNIST", "raw").resolve()
    missing = [Path(name).stem for name, _ in MNIST.resources if not (raw / Path(name).stem).exists()]
    how = (
        "Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        f't10k-labels-idx1-ubyte in {raw} (on a machine with network: python -c "from torchvision.datasets '
        "import MNIST; MNIST('data', download=True)\"), or pass --data_path to the folder that holds MNIST/."
    )
    splits = {}
    for name, train in (("train", True), ("test", False)):
        try:
            ds = MNIST(args.data_path, train=train, download=bool(missing))
        except (RuntimeError, OSError, ValueError) as e:
            if missing:
                raise StartError(
                    f"MNIST is not in {raw} ({', '.join(missing)} missing) and could not be downloaded "
                    f"({described(e)}).\n{how}"
                ) from None
            why = f"the MNIST files in {raw} could not be read ({described(e)}); they may be truncated or corrupted"
            raise StartError(f"{why}.\n{how}") from None
        x = ds.data.unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)  # in place: 0.25 s
        splits[name] = TensorDataset(x, ds.targets)
    return Data(splits, classes=[str(digit) for digit in range(10)], input_shape=(1, 28, 28))


# ==============================================================================================
# MODEL, built from the hyper-parameters and the data's description.


def build_model(args: Namespace, data: Data) -> nn.Module:
    """An MLP: --hidden layer widths, ReLU, --dropout after each hidden layer."""
    layers, width = [nn.Flatten()], math.prod(data.input_shape)
    for h in args.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(args.dropout)] if args.dropout else [])
        width = h
    return nn.Sequential(*layers, nn.Linear(width, len(data.classes)))


# ==============================================================================================
# LOSS and PREDICTIONS: training, evaluation and the check before the first epoch all use these two.


def loss_of(logits: torch.Tensor, labels: torch.Tensor, args: Namespace) -> torch.Tensor:
    """The loss of a batch; `args` carries the flags a loss of your own may take (a label smoothing, say)."""
    return F.cross_entropy(logits, labels)


def predictions_of(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class of each row of outputs: what the metrics score. A metric of the scores (top-5
    accuracy, AUROC) reads the scores instead: return logits.float() (docs/tags-and-metrics.md)."""
    return logits.argmax(1)


# ==============================================================================================
# OPTIMIZER and SCHEDULE. The schedule is stepped after each optimizer step and kept in the checkpoint,
# so a resumed run goes on with it; a schedule of your own replaces build_schedule.


def build_optimizer(args: Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """fused=True: one kernel for every parameter's update."""
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    return torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=True
    )


def build_schedule(args: Namespace, optimizer: torch.optim.Optimizer, steps: int):
    """The learning rate over the run's `steps` optimizer steps: a torch.optim.lr_scheduler, or None."""
    return schedules.standard(optimizer, args.lr_schedule, args.warmup, steps)


# ==============================================================================================
# TRAINING: one pass over the training split.


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, steps: Steps, args: Namespace) -> None:
    """`steps` deals the batches (it ends the epoch early when the run is stopped) and keeps, on the
    device, what the epoch's statistics and the detectors need: hand it each step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for x, y in steps:
        with steps.autocast():  # --precision bf16: the forward pass and the loss under autocast
            logits = model(x)
            loss = loss_of(logits, y, args)
        steps.scaled(loss).backward()  # --accumulate N: N batches' gradients add up to one step's
        if not steps.keep(loss, logits, y):  # sync point: False for a non-finite loss or gradient, never stepped
            break
        if not steps.stepping:  # the step waits for the rest of its batches
            continue
        if args.grad_clipping:
            nn.utils.clip_grads_with_norm_(steps.params, args.grad_clipping, steps.grad_norm())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        # YOUR LOGGING: your own per-batch wandb.log goes here, as in any W&B script, and lands in this run:
        #     wandb.log({"batch/lr": optimizer.param_groups[0]["lr"]})
        # A device value (loss.item()) makes the host wait: test_syncs names any such line in this loop.


# ==============================================================================================
# EVALUATION: the predictions on a split ("val" or "test"), each epoch, its labels and its loss; the run
# scores them with every metric of utils.METRICS. A fork's own look (a confusion matrix in W&B) goes here.


@torch.inference_mode()
def evaluate(model: nn.Module, batches, split: str, args: Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.eval()
    predictions, labels, loss = [], [], 0.0
    for x, y in batches.batches(4096):  # no result depends on it: as large as memory allows
        with devices.autocast(args.precision, x.device):  # the precision the model is trained in
            logits = model(x)
            loss = loss + loss_of(logits, y, args).float() * len(y)
        predictions.append(predictions_of(logits))
        labels.append(y)
    return torch.cat(predictions), torch.cat(labels), loss / len(batches)


# ==============================================================================================


def main(argv: list[str] | None = None, link: watch.Link | None = None) -> int:
    """One run of this experiment: its folder, W&B, the epochs, the tags, the end; its exit status."""
    parts = (get_parser, load_data, build_model, build_optimizer, build_schedule, train_epoch, evaluate)
    parts += (loss_of, predictions_of)
    return session.main(session.Experiment(*parts), argv, link)


if __name__ == "__main__":
    session.exit(main(link=LINK))
