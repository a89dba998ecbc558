"""Train an MLP on MNIST with a hand-written loop; group and tag the run in Weights & Biases.

    python main.py --data_path ../shared/data                      # standalone, summary on screen
    python main.py --data_path ../shared/data --save yes           # + model and results under outputs/
    python main.py --data_path ../shared/data --wandb_project mnist
    WANDB_MODE=offline python main.py --wandb_project mnist        # upload later with `wandb sync`
    wandb agent SWEEP_ID                                           # runs `python main.py --key=value ...`
    python main.py --data_path ../shared/data --resume yes         # go on from where a stopped run was

An ordinary W&B training script: wandb.init, run.log and finish happen in the process that trains
(runs.py), so a fork's own wandb.log calls anywhere in the training code land in the run. By
default it runs under a small guard (watch.py: `python main.py` starts itself again, as torchrun
does) that ends the run properly if training crashes or hangs (tagged, saved, Failed in W&B);
--watchdog no trains without it, and so does a run under a debugger (its breakpoints stop there).
Every option: `python main.py --help`. Exit status: 0 when the run ended without an error tag (or
declined to train a pruned combination), 1 when it ended with one (or could not start), 2 for an
invalid command line, 130 or 143 when Ctrl+C or SIGTERM stopped it before the run began.
"""

import signal

if __name__ == "__main__":  # first of all: stop signals wait until this process can act on them (watch.py)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))

import contextlib
import logging
import math
import os
import pickle
import random
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import runs
import utils
import wandb_start
import watch

if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line as it is printed, as a terminal does
    # Parse before torch loads (2 s): --help and usage errors answer at once. main() parses again.
    args = utils.get_arg_parser().parse_args()
    if args.watchdog and not watch.guarded() and (debugged := watch.debugger()):
        print(
            f"Debugging ({debugged}): training in this process, without the guard (as --watchdog no).",
            file=sys.stderr,
            flush=True,
        )
    elif args.watchdog and not watch.guarded():  # this process becomes the guard, and never loads torch
        wandb_start.exit(watch.guard(__file__, sys.argv[1:], args.epoch_timeout))
    # The training process: from here a stop before the run begins ends it at once (see watch.Link).
    LINK = watch.Link(watch.Channel(), whole_process=True).listen()

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

with warnings.catch_warnings():  # torcheval 0.0.7 still decorates with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from torcheval.metrics import functional as torcheval_functional
from torchvision.datasets import MNIST
from tqdm import tqdm

# How the loop gets its batches (imported here, after the guard's early exit: it loads torch).
from batches import DeviceBatches, batches_of, hold_out  # noqa: F401 (DeviceBatches: for benchmarks and tests)

# Macro F1 leaves a class absent from a split out, as the baselines do (utils.most_probable_f1);
# torcheval says so on the root logger each time, e.g. for every epoch cut short by a stop.
logging.getLogger().addFilter(lambda record: "Some classes do not exist in the target" not in record.getMessage())

SYNC_EVERY = 50  # batches between the host's looks at the non-finite flag on an accelerator
OUTPUTS_PER_ARGMAX = 32  # batches of the model's outputs kept for one argmax (their predictions)
EVAL_BATCH = 4096
# Measured with benchmarks/throughput.py (see docs/performance.md).
BF16_EMULATED_COST = (
    "an epoch of the default model took 1.2 times as long as in fp32 on a CPU whose bf16 "
    "instructions were turned off (ONEDNN_MAX_CPU_ISA=AVX512_CORE), and half as long with them"
)


# ==============================================================================================
# SEAM: the data. load_data() is the one place that knows it is MNIST: it loads the splits and
# says what they are. Everything else (the model's sizes, the baselines, the detectors, W&B's
# config) reads this description.


@dataclass
class Data:
    splits: dict[str, Dataset]  # "train" and "test", and "val" if the data has its own (else --val_size holds it out)
    classes: list[str]  # the class names; the labels are 0 to len(classes) - 1
    input_shape: tuple[int, ...]  # one sample's


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_data(opts: dict) -> Data:
    """MNIST from --data_path (downloaded there when missing), normalised, as tensors. Data without a
    test split of its own: hold one out of the training split, `splits["train"], splits["test"] =
    hold_out(splits["train"], size)`."""
    raw = Path(opts["data_path"], "MNIST", "raw").resolve()
    missing = [Path(name).stem for name, _ in MNIST.resources if not (raw / Path(name).stem).exists()]
    how = (
        "Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        f't10k-labels-idx1-ubyte in {raw} (on a machine with network: python -c "from torchvision.datasets '
        "import MNIST; MNIST('data', download=True)\"), or pass --data_path to the folder that holds MNIST/."
    )
    splits = {}
    for name, train in (("train", True), ("test", False)):
        try:
            ds = MNIST(opts["data_path"], train=train, download=bool(missing))
        except (RuntimeError, OSError, ValueError) as e:
            reason = utils.described(e)
            if missing:
                raise utils.StartError(
                    f"MNIST is not in {raw} ({', '.join(missing)} missing) and could not "
                    f"be downloaded ({reason}).\n{how}"
                ) from None
            raise utils.StartError(
                f"the MNIST files in {raw} could not be read ({reason}); they may be truncated or corrupted.\n{how}"
            ) from None
        x = ds.data.unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)  # in place: 0.25 s
        splits[name] = TensorDataset(x, ds.targets)
    return Data(splits, classes=[str(digit) for digit in range(10)], input_shape=(1, 28, 28))


# ==============================================================================================
# SEAM: the model, built from the options and the data's description.


def build_model(opts: dict, data: Data) -> nn.Module:
    """An MLP: --hidden layer widths, ReLU, --dropout after each hidden layer."""
    layers, width = [nn.Flatten()], math.prod(data.input_shape)
    for h in opts["hidden"]:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(opts["dropout"])] if opts["dropout"] else [])
        width = h
    return nn.Sequential(*layers, nn.Linear(width, len(data.classes)))


# SEAM: the loss, and the predictions the metrics score. Training, evaluation and the check before the
# first epoch all use these two.


def loss_of(logits: torch.Tensor, labels: torch.Tensor, opts: dict) -> torch.Tensor:
    """The loss of a batch; `opts` carries the flags a fork's loss may take (a label smoothing, say)."""
    return F.cross_entropy(logits, labels)


def predictions_of(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class of each row of outputs."""
    return logits.argmax(1)


# ----------------------------------------------------------------------------------------------
# Training


def mixed_precision(opts: dict, device: torch.device):
    """Where the forward pass and the loss run: in bf16 under autocast with --precision bf16 (matrix
    products in bf16, reductions such as the loss in fp32), else in fp32. Parameters, gradients and the
    optimizer's state are fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts["precision"] == "bf16")


def sync_interval(device: torch.device) -> int:
    """Batches between the host's looks at the device: on the CPU a look costs nothing."""
    return 1 if device.type == "cpu" else SYNC_EVERY


def squared_gradient_norms(params: list[nn.Parameter]):
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


def train_epoch(model, optimizer, data, opts, generator, stop, sync_every, verbose) -> tuple[dict | None, str | None]:
    """One pass over the training split (`data`: its batches). Returns the epoch's statistics (None if no batch ran)
    and the error tag that stopped it early, if any. The host looks at the device every
    `sync_every` batches (see sync_interval)."""
    model.train()
    start = time.perf_counter()
    deadline = start + 60 * opts["epoch_timeout"] if opts["epoch_timeout"] else math.inf
    bs = opts["batch_size"]
    params = [p for p in model.parameters() if p.requires_grad]  # a fork may freeze some
    squared_norms = squared_gradient_norms(params)
    rows, outputs, predictions, targets = [], [], [], []  # device tensors, read once at the end
    # On an accelerator, 1 from the first non-finite loss or gradient norm on. Between the host's looks,
    # the fused optimizers read it as GradScaler's found_inf and skip their step on the device themselves.
    # A private attribute (GradScaler's way to talk to the fused optimizers), kept for speed: the public way
    # waits for the device every batch. test_training's test_the_private_apis_kept_for_speed pins it.
    nonfinite = torch.zeros((), device=params[0].device)
    optimizer.found_inf = nonfinite if sync_every > 1 else None

    stop_tag = None
    batches = tqdm(
        data.batches(bs, generator), total=-(-len(data) // bs), leave=False, disable=verbose < 2, desc="batches"
    )
    for i, (x, y) in enumerate(batches):
        if stop.requested:
            stop_tag = stop.tag
            break
        if time.perf_counter() > deadline:
            stop_tag = utils.TIMEOUT()
            break
        with mixed_precision(opts, x.device):
            logits = model(x)
            loss = loss_of(logits, y, opts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The loss and each parameter's squared gradient norm (the true one, before clipping), in one tensor.
        row = torch.stack([loss.detach(), *squared_norms()])
        rows.append(row)
        outputs.append(logits.detach())
        targets.append(y)
        if len(outputs) == OUTPUTS_PER_ARGMAX:  # one argmax for many batches: 10 us a batch less on the CPU
            predictions.append(predictions_of(torch.cat(outputs)))
            outputs.clear()
        # Never step with a non-finite loss or gradient. On the CPU the host reads the row (a
        # microsecond; a flag on the device would cost four small ops, 3% of a bf16 step).
        if sync_every == 1:
            if not all(map(math.isfinite, row.tolist())):  # sync point, every batch (on the CPU)
                break
        else:
            nonfinite.logical_or_(row.isfinite().all().logical_not_())
            if (i + 1) % sync_every == 0 and nonfinite.item():  # sync point, every sync_every batches
                break
        if opts["grad_clipping"]:
            nn.utils.clip_grads_with_norm_(params, opts["grad_clipping"], row[1:].sum().sqrt())
        optimizer.step()
        # SEAM: your own per-batch logging goes here, as in any W&B script, and lands in this run:
        #     wandb.log({"batch/lr": optimizer.param_groups[0]["lr"]})
        # A device value (loss.item()) makes the host wait: test_syncs names any such line in this loop.

    if not rows:
        return None, stop_tag
    if outputs:
        predictions.append(predictions_of(torch.cat(outputs)))
    # Sync point, once per epoch: the epoch's statistics, read to the host together. In float64 the
    # total gradient norm is finite whenever each parameter's is, as the look in the loop judged it.
    rows = torch.stack(rows).cpu().double()
    losses, norms = rows[:, 0].tolist(), rows[:, 1:].sum(1).sqrt().tolist()
    bad = utils.nonfinite_step(losses, norms)
    if bad:  # the batches after the bad one took no step: they are not part of the epoch
        stop_tag, losses, norms = bad[1], losses[: bad[0] + 1], norms[: bad[0] + 1]
    targets = torch.cat(targets[: len(losses)])
    seen = len(targets)
    predictions = torch.cat(predictions)[:seen]
    stats = metric_values(predictions, targets, "train", logits.shape[1])  # the model's outputs: one a class
    sizes = [bs] * (len(losses) - 1) + [seen - bs * (len(losses) - 1)]
    mean, std, low, high = utils.describe(norms)
    stats.update(
        {
            "train/loss": sum(v * s for v, s in zip(losses, sizes, strict=True)) / seen,
            "train/grad_norm_mean": mean,
            "train/grad_norm_std": std,
            "train/grad_norm_min": low,
            "train/grad_norm_max": high,
            "train/batches": len(losses),
            "train/time": time.perf_counter() - start,
        }
    )
    return stats, stop_tag


# ----------------------------------------------------------------------------------------------
# Evaluation


def metric_values(predictions: torch.Tensor, targets: torch.Tensor, split: str, classes: int) -> dict[str, float]:
    """Every metric of utils.METRICS on a split, by the torcheval function the table names."""
    values = [
        getattr(torcheval_functional, m.torcheval)(predictions, targets, num_classes=classes, **dict(m.options))
        for m in utils.METRICS
    ]
    values = torch.stack(values).tolist()  # sync point: once per split and epoch
    return {f"{split}/{m.name}": v for m, v in zip(utils.METRICS, values, strict=True)}


@torch.inference_mode()
def evaluate(model, data, split: str, classes: int, opts: dict) -> dict[str, float]:
    model.eval()
    start = time.perf_counter()
    predictions, targets = [], []
    for x, y in data.batches(EVAL_BATCH):
        with mixed_precision(opts, x.device):  # the precision the model is trained in
            predictions.append(predictions_of(model(x)))
        targets.append(y)
    return {
        **metric_values(torch.cat(predictions), torch.cat(targets), split, classes),
        f"{split}/time": time.perf_counter() - start,
    }


def check_one_batch(model, data, opts: dict, description: Data, guesses: dict) -> None:
    """Before the first epoch, one batch through the model, the loss, the metrics and every detector, so
    that a model that does not fit the data or a metric that cannot be computed fails in seconds with a
    clear message, not as a crash mid-run. It leaves the random generators and the model as they were."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            model.eval()  # no dropout draw, no batch-norm update
            x, y = next(data.batches(opts["batch_size"]))
            with mixed_precision(opts, device):
                logits = model(x)
                loss = loss_of(logits, y, opts)
            loss.backward()
            model.zero_grad(set_to_none=True)
            values = metric_values(predictions_of(logits.detach()), y, "train", len(description.classes))
            row = {f"{split}/{key.split('/')[1]}": v for split in utils.SPLITS for key, v in values.items()}
            row.update({f"gap/{m}": 0.0 for m in utils.METRIC_NAMES}, **guesses)
            utils.gradient_tags(1.0, 1.0, 0.0, opts)
            utils.overfitting_tags(row, opts["overfitting_threshold"], utils.OVERFITTING_END)
            for baseline, tag in (("random", utils.RANDOM_GUESSING), ("most_probable", utils.MOST_PROBABLE_GUESSING)):
                utils.guessing_tags(row, baseline, 0.0, tag)
        except Exception as e:  # noqa: BLE001 (whatever a fork's model, loss or data raise: named to the user)
            raise utils.StartError(
                f"one batch through the model, the loss, the metrics and the detectors failed before training "
                f"({utils.described(e)}). Check build_model against the data's description (one sample's "
                f"shape {description.input_shape}, {len(description.classes)} classes) and the metrics table "
                "(utils.METRICS); nothing was trained."
            ) from None


def baselines(data: dict, classes: int) -> dict[str, float]:
    """What guessing scores on each split (utils.baselines), from its labels, counted once."""
    return utils.baselines(
        {split: torch.bincount(batches.labels(), minlength=classes).tolist() for split, batches in data.items()}
    )


# ----------------------------------------------------------------------------------------------
# The run: train() loads the data, builds the model, then trains and evaluates epoch after epoch.
# `record` (runs.py) starts W&B, logs and saves each epoch as it ends, and writes the run's end.


def seed_everything(seed: int) -> None:
    """torch, and the generators a fork's own code may draw from (augmentation with numpy or random)."""
    torch.manual_seed(seed)
    np.random.seed([seed % 2**32, seed // 2**32])  # numpy's legacy seed takes 32-bit words
    random.seed(seed)


def state_of(thing) -> object:
    """What a checkpoint keeps of a piece of training state: its state_dict (a model, an optimizer, a
    scheduler, a GradScaler), or a random generator's state."""
    return thing.get_state() if isinstance(thing, torch.Generator) else thing.state_dict()


def restore(thing, state: object) -> None:
    if isinstance(thing, torch.Generator):
        thing.set_state(state)
    else:
        thing.load_state_dict(state)


def save_checkpoint(path: Path, epoch: int, stateful: dict, history: list, tags: list) -> None:
    """Everything a resumed run needs to go on as if it had never stopped, written whole or not at all:
    each piece of `stateful` (see train()), the process's random generators, the history and the tags.
    Only tensors and plain values, so that load_checkpoint can refuse anything else."""
    numpy_rng = np.random.get_state(legacy=False)
    state = {
        "epoch": epoch,
        "stateful": {name: state_of(thing) for name, thing in stateful.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python_rng": random.getstate(),
        "numpy_rng": {
            **numpy_rng,
            "state": {
                "key": torch.from_numpy(numpy_rng["state"]["key"].astype(np.int64)),
                "pos": numpy_rng["state"]["pos"],
            },
        },
        "history": history,
        "tags": tags,
    }
    utils.atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, device: torch.device, stateful: dict) -> tuple[int, list, list]:
    """Restores what save_checkpoint wrote into each piece of `stateful`; returns the epoch it was written
    after, the history and the tags. weights_only: a checkpoint found on shared storage is data, and must
    not run code as it loads."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if missing := set(stateful) - set(state["stateful"]):  # a piece added since the checkpoint was written
            raise KeyError(f"it holds no {', '.join(sorted(missing))}")
        for name, thing in stateful.items():
            restore(thing, state["stateful"][name])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        numpy_rng = state["numpy_rng"]
        np.random.set_state(
            {
                **numpy_rng,
                "state": {"key": numpy_rng["state"]["key"].numpy().astype(np.uint32), "pos": numpy_rng["state"]["pos"]},
            }
        )
    except pickle.UnpicklingError:  # what weights_only refuses: the file would run code as it loads
        unsafe = []
        with contextlib.suppress(Exception):  # torch's own list of what it would call; a damaged file has none
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        what = f"it calls {', '.join(unsafe)}" if unsafe else "objects that run code on loading"
        raise utils.StartError(
            f"the checkpoint {path} holds more than tensors and plain values ({what}), so it "
            "was not loaded. A checkpoint this code wrote never does: delete the file (the run "
            "then trains again from its start), and find out what wrote it."
        ) from None
    except Exception as e:  # noqa: BLE001 (truncated, empty, another model's: the message names it)
        raise utils.StartError(
            f"the checkpoint {path} could not be loaded ({utils.described(e)}). It may be truncated, "
            "written by another version of the code, or not a checkpoint at all; delete it "
            "to train this run again from its start."
        ) from None
    return state["epoch"], state["history"], state["tags"]


def train(opts: dict, folder: Path | None, resume: bool, record: runs.Record, stop: watch.Link) -> None:
    device = torch.device(opts["device"])
    description = load_data(opts)
    splits, classes = description.splits, len(description.classes)
    if "val" not in splits:
        if opts["val_size"] >= len(splits["train"]):
            raise utils.UsageError(
                f"argument --val_size: {opts['val_size']} leaves no training data "
                f"(the training set has {len(splits['train'])} samples)"
            )
        splits["train"], splits["val"] = hold_out(splits["train"], opts["val_size"])
    data = {split: batches_of(splits[split], device, opts["workers"]) for split in utils.SPLITS}
    for split, batches in data.items():
        labels = batches.labels()
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
            raise utils.StartError(
                f"the {split} labels go from {int(labels.min())} to {int(labels.max())}, "
                f"outside the data's {classes} classes 0 to {classes - 1} (load_data says "
                f"{description.classes})."
            )
    guesses = baselines(data, classes)

    seed_everything(opts["seed"])
    generator = torch.Generator().manual_seed(opts["seed"])
    try:
        model = build_model(opts, description).to(device)
    except (torch.OutOfMemoryError, MemoryError) as e:  # an accelerator's allocator, or Python's
        raise utils.StartError(
            f"the model does not fit in the memory of {device} ({utils.described(e)}); make it smaller."
        ) from None
    except RuntimeError as e:  # the CPU's allocator has no type of its own: its message says "can't allocate memory"
        raise utils.StartError(f"the model could not be built on {device} ({utils.described(e)})") from None
    if opts["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"], fused=True)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=opts["lr"], momentum=opts["momentum"], weight_decay=opts["weight_decay"], fused=True
        )
    # SEAM: the training state a checkpoint keeps and a resume restores (state_dict or a generator's state):
    # a scheduler, a GradScaler or an EMA of the weights a fork adds goes here too, by a name of its own.
    stateful = {"model": model, "optimizer": optimizer, "generator": generator}
    checkpoint = folder / "checkpoint.pt" if folder else None
    done, history, tags, unsaved = 0, [], [], None
    if resume and checkpoint and checkpoint.exists():
        done, history, tags = load_checkpoint(checkpoint, device, stateful)
    check_one_batch(model, data["train"], opts, description, guesses)
    # What this data and model are, once: W&B's config and results.json keep it, not every epoch's row.
    with stop.deferred():  # the run begins whole (W&B, results.json) before a stop can end it
        record.start(
            {
                **guesses,
                **{f"data/{split}_size": len(batches) for split, batches in data.items()},
                "data/classes": description.classes,
                "data/input_shape": list(description.input_shape),
                "model/parameters": sum(p.numel() for p in model.parameters()),
                "torch/threads": torch.get_num_threads(),
            }
        )
        stop.begun()

    sync_every = sync_interval(device)
    for epoch in tqdm(range(done + 1, opts["epochs"] + 1), disable=opts["verbose"] < 1, desc="epochs"):
        record.epoch_started(epoch)
        stats, stop_tag = train_epoch(
            model, optimizer, data["train"], opts, generator, stop, sync_every, opts["verbose"]
        )
        final = epoch == opts["epochs"] and stats is not None and stop_tag is None
        if final:  # every batch is trained: the run's work is done, and a stop changes nothing now
            stop.close()
        if stats is None or stop_tag in (utils.PREEMPTED(), utils.STOPPED()):  # trained again on resume
            utils.add_tags(tags, [stop_tag])
            break
        # "evaluated": trained to its end and evaluated, as W&B's history holds it (and a resume counts it)
        row = {"epoch": epoch, **stats, "evaluated": stop_tag is None}
        if stop_tag is None:  # a stopped epoch is not evaluated: its model is not the epoch's end
            for split in ("val", "test"):
                row.update(evaluate(model, data[split], split, classes, opts))
            row.update({f"gap/{m}": row[f"train/{m}"] - row[f"test/{m}"] for m in utils.METRIC_NAMES})
            epoch_time = sum(row[f"{s}/time"] for s in utils.SPLITS)
            if opts["epoch_timeout"] and epoch_time > 60 * opts["epoch_timeout"]:
                stop_tag = utils.TIMEOUT()
        history.append(row)
        utils.add_tags(
            tags,
            utils.gradient_tags(
                row["train/grad_norm_min"], row["train/grad_norm_max"], row["train/grad_norm_std"], opts
            )
            + utils.overfitting_tags(row, opts["overfitting_threshold"], utils.OVERFITTING_LEARNING),
        )
        record.log(row, tags)
        if opts["verbose"]:
            tqdm.write(summary_line(row, opts["epochs"]))
        if checkpoint and opts["checkpoint_every"] and row["evaluated"] and epoch % opts["checkpoint_every"] == 0:
            unsaved = utils.write_failure(
                checkpoint,
                lambda: save_checkpoint(checkpoint, epoch, stateful, history, tags),  # noqa: B023 (called at once)
            )
            stop_tag = utils.SAVE_FAILED() if unsaved else stop_tag  # the previous checkpoint stays whole
        stop_tag = stop_tag or (None if final else stop.tag)  # a signal in evaluation or saving: the epoch is whole
        if stop_tag:
            utils.add_tags(tags, [stop_tag])
            break
    else:
        tags.insert(0, utils.SUCCESS())

    evaluated = [row for row in history if row["evaluated"]]
    if evaluated:
        last = {**guesses, **evaluated[-1]}  # the guessing detectors compare with the baselines
        utils.add_tags(
            tags,
            utils.overfitting_tags(last, opts["overfitting_threshold"], utils.OVERFITTING_END)
            + utils.guessing_tags(last, "random", opts["rnd_threshold"], utils.RANDOM_GUESSING)
            + utils.guessing_tags(last, "most_probable", opts["mp_threshold"], utils.MOST_PROBABLE_GUESSING),
        )
    if opts["save"] and not unsaved:
        model_file = folder / "model.pt"
        unsaved = utils.write_failure(
            model_file, lambda: utils.atomic_write(model_file, lambda f: torch.save(model.state_dict(), f))
        )
        utils.add_tags(tags, [utils.SAVE_FAILED()] if unsaved else [])
    record.finish(tags, unsaved)


def train_reporting_bugs(opts: dict, folder: Path | None, resume: bool, record: runs.Record, stop: watch.Link) -> None:
    """train(), with an exception raised in it (a bug in the training code) made the run's end: its
    traceback on screen, the run Failed, and no advice to resume, which would only raise it again."""
    try:
        train(opts, folder, resume, record, stop)
    except (utils.StartError, utils.RunEnded):  # the run could not start, or its end is written
        raise
    except Exception as e:  # noqa: BLE001 (a bug in the training code: shown whole, and the run's end written)
        if record.run and wandb_start.lost_under(e):  # W&B's fault, under a call of the fork's own: not a bug
            record.lost_wandb("your training code called it", e, "The run stops here, resumable")
            record.finish(record.tags + [utils.WANDB_LOST()])
            return
        traceback.print_exc()
        record.finish(
            record.tags + [utils.EXCEPTION()],
            "the training code raised an exception (its traceback is above); fix it, then start the run again",
        )


def summary_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}  loss {row['train/loss']:.4f}"
    for metric in utils.METRIC_NAMES:
        line += f"  {metric} " + " ".join(
            f"{s} {row[f'{s}/{metric}']:.4f}" for s in utils.SPLITS if f"{s}/{metric}" in row
        )
    return line + f"  ({sum(v for k, v in row.items() if k.endswith('/time')):.1f} s)"


# ----------------------------------------------------------------------------------------------


def device_error(device: str) -> str | None:
    """Why `device` cannot be used here, if it cannot; never creates a CUDA context in this process."""
    try:
        d = torch.device(device)
        if d.type == "cuda":
            if not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
                return "no such CUDA device"
        else:
            torch.empty(0, device=d)
    except (RuntimeError, AssertionError) as e:
        return utils.described(e)
    return None


def bf16_error(device: torch.device) -> str | None:
    """Why bf16 cannot run on `device`, if it cannot; a warning where it would run, but slowly."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return "this GPU has no bf16 arithmetic: it needs compute capability 8.0 (Ampere) or newer"
        return None
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            torch.mm(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
    except (RuntimeError, AssertionError, ValueError) as e:
        return utils.described(e)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            flags = "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
            if why := utils.slow_bf16_cpu(flags, os.environ.get("ONEDNN_MAX_CPU_ISA", "")):
                print(
                    f"Warning: --precision bf16 runs emulated here, slower than fp32 ({why}): "
                    f"{BF16_EMULATED_COST}. Use fp32 on this machine.",
                    file=sys.stderr,
                )
    return None


def use_the_allowed_cores() -> None:
    """Torch's threads: one per core this process may run on (a sweep's workers, a job's share, taskset),
    unless the user set OMP_NUM_THREADS, which torch reads itself."""
    if not os.environ.get("OMP_NUM_THREADS") and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def main(argv: list[str] | None = None, link: watch.Link | None = None) -> int:
    """One run; its exit status. `link` hears stop signals (a new one, and its handlers restored at
    the end, for a caller in this process)."""
    link = link or watch.Link(watch.Channel())
    with link:
        return run(argv, link)


def run(argv: list[str] | None, link: watch.Link) -> int:
    parser = utils.get_arg_parser()
    opts = vars(parser.parse_args(argv))
    any_seed = opts["seed"] == utils.RANDOM_SEED  # --resume yes then continues a stopped run of any seed
    opts["seed"] = utils.resolve_seed(opts["seed"])
    opts["device"] = opts["device"] or os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if why := device_error(opts["device"]):
        parser.error(f"argument --device: {opts['device']!r} cannot be used here ({why})")
    if opts["precision"] == "bf16" and (why := bf16_error(torch.device(opts["device"]))):
        parser.error(f"argument --precision: bf16 cannot run on {opts['device']} ({why}); use fp32")
    use_the_allowed_cores()
    config = {**opts, "group": utils.generate_name(opts)}

    reasons = utils.prune_hyperparameters(opts, parser)
    for reason in reasons:
        print(f"Warning: irrelevant hyper-parameters: {reason}", file=sys.stderr)
    keep = opts["save"] or opts["checkpoint_every"]  # checkpoints live in the run folder too
    # Under `wandb agent` a run id that left a checkpoint is a preempted run W&B has re-queued.
    resume = keep and (opts["resume"] or bool(os.environ.get("WANDB_RUN_ID")))
    folder, previous, lock = None, None, None
    try:
        if keep:
            with link.deferred():  # the folder is made and owned whole, or not at all
                folder, previous, lock = runs.run_folder(opts, config, resume, any_seed and opts["resume"])
                link.unstarted = folder
        if previous:  # a run resumed: its own seed (another than drawn, with --seed random)
            opts["seed"] = config["seed"] = previous["seed"]
        record = runs.Record(opts, config, folder, previous["history"] if previous else [], link)
        if reasons and opts["abort_irrelevant"]:
            with link.deferred():
                record.start({})
                link.begun()
            record.finish([utils.IRRELEVANT()])
            # Failed in W&B and tagged, but it did what was asked (declined to train): exit 0, so W&B's
            # agent does not take a sparse sweep's pruned runs for a broken setup (its flapping checks).
            return 0
        train_reporting_bugs(opts, folder, resume, record, link)
        return record.status
    except runs.AlreadyEnded as ended:
        results = ended.results
        print(
            f"--resume yes: this run has ended already, in {ended.folder}: {results['status']} after "
            f"{len(results['history'])} epochs, tags {', '.join(results['tags']) or 'none'}. Nothing to train "
            "(without --resume yes it trains again).",
            file=sys.stderr,
        )
        return int(results["status"] != "finished")
    except utils.UsageError as e:  # a command-line value the data rules out
        parser.error(str(e))
    except utils.StartError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except utils.RunEnded:  # its end is written: results.json could not be saved
        return record.status
    finally:
        link.close()  # what follows tidies up whatever ended the run: no stop interrupts it
        runs.remove_if_unstarted(folder)
        if lock is not None:  # the run has ended: its folder is free for the next process
            os.close(lock)


if __name__ == "__main__":
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named semaphore, which a killed process leaks
    wandb_start.exit(main(link=LINK))
