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
--watchdog no trains without it.
Every option: `python main.py --help`. Exit status: 0 when the run ended without an error tag (or
declined to train a pruned combination), 1 when it ended with one (or could not start), 2 for an
invalid command line.
"""

import logging
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import runs
import utils
import watch

if __name__ == "__main__":
    # Parse before torch loads (2 s): --help and usage errors answer at once. main() parses again.
    args = utils.get_arg_parser().parse_args()
    if args.watchdog and not watch.guarded():  # this process becomes the guard, and never loads torch
        sys.exit(watch.guard(__file__, sys.argv[1:], args.epoch_timeout))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # torcheval 0.0.7 still decorates with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from torcheval.metrics.functional import multiclass_accuracy, multiclass_f1_score
from torchvision.datasets import MNIST
from tqdm import tqdm

# Macro F1 leaves a class absent from a split out, as the baselines do (utils.most_probable_baseline);
# torcheval says so on the root logger each time, e.g. for every epoch cut short by a stop.
logging.getLogger().addFilter(lambda record: "Some classes do not exist in the target" not in record.getMessage())

NUM_CLASSES = 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
VAL_SPLIT_SEED = 0  # the validation split is fixed: it never moves with --seed
SYNC_EVERY = 50  # batches between the host's looks at the non-finite flag on an accelerator
EVAL_BATCH = 4096


# ----------------------------------------------------------------------------------------------
# Model


def build_model(hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers, width = [], 28 * 28
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))


# ----------------------------------------------------------------------------------------------
# Data: each split once, normalised, flattened and on the training device. Batches are slices
# of a seeded permutation, so there is no per-sample Python and no DataLoader.


def load_mnist(data_path: str, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    raw = Path(data_path, "MNIST", "raw").resolve()
    missing = [Path(name).stem for name, _ in MNIST.resources if not (raw / Path(name).stem).exists()]
    how = ("Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
           f"t10k-labels-idx1-ubyte in {raw} (on a machine with network: python -c \"from torchvision.datasets "
           "import MNIST; MNIST('data', download=True)\"), or pass --data_path to the folder that holds MNIST/.")
    splits = {}
    for name, train in (("train", True), ("test", False)):
        try:
            ds = MNIST(data_path, train=train, download=bool(missing))
        except (RuntimeError, OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[-1]
            if missing:
                raise utils.StartError(f"MNIST is not in {raw} ({', '.join(missing)} missing) and could not "
                                       f"be downloaded ({reason}).\n{how}") from None
            raise utils.StartError(f"the MNIST files in {raw} could not be read ({reason}); they may be "
                                   f"truncated or corrupted.\n{how}") from None
        if len(ds.targets) and not 0 <= int(ds.targets.min()) <= int(ds.targets.max()) < NUM_CLASSES:
            raise utils.StartError(f"the MNIST labels in {raw} go from {int(ds.targets.min())} to "
                                   f"{int(ds.targets.max())}, outside the {NUM_CLASSES} classes 0 to "
                                   f"{NUM_CLASSES - 1}; the files are not MNIST's.")
        x = ds.data.float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).reshape(len(ds.data), -1)  # in place: 0.25 s
        splits[name] = (x.to(device), ds.targets.to(device))
    return splits


def hold_out(x: torch.Tensor, y: torch.Tensor, size: int):
    """Split off a validation set by a permutation that depends on VAL_SPLIT_SEED alone."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).to(y.device)
    return (x[order[size:]], y[order[size:]]), (x[order[:size]], y[order[:size]])


# ----------------------------------------------------------------------------------------------
# Training


class StopRequest:
    """SIGINT (Ctrl+C), SIGTERM (a scheduler's preemption) and the guard's SIGUSR1 (a stop) ask the loop to
    stop at the next batch (one that comes while the data loads: at the first), tagged as utils.STOP_SIGNALS
    says. Asking again changes nothing here: the guard decides what a second Ctrl+C does (it kills training).
    `heard(tag)` is told of the first: the guard learns from it that this process had a SIGTERM of its own."""

    def __init__(self, heard=lambda tag: None):
        self.tag, self.heard = None, heard

    @property
    def requested(self) -> bool:
        return self.tag is not None

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in utils.STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.tag is None:
            self.tag = utils.STOP_SIGNALS[signum]()
            self.heard(self.tag)
            print(f"\nStopping at the next batch: {self.tag}.", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def sync_interval(device: torch.device) -> int:
    """Batches between the host's looks at the device: on the CPU a look costs nothing."""
    return 1 if device.type == "cpu" else SYNC_EVERY


def train_epoch(model, optimizer, x, y, opts, generator, stop, sync_every, verbose) -> tuple[dict | None, str | None]:
    """One pass over the training split. Returns the epoch's statistics (None if no batch ran)
    and the error tag that stopped it early, if any. The host looks at the device every
    `sync_every` batches (see sync_interval)."""
    model.train()
    start = time.perf_counter()
    deadline = start + 60 * opts["epoch_timeout"] if opts["epoch_timeout"] else math.inf
    bs = opts["batch_size"]
    params = list(model.parameters())
    # Sync point, once per epoch: the permutation is drawn on the CPU, the same on every device.
    order = torch.randperm(len(y), generator=generator).to(y.device)
    losses, norms, predictions = [], [], []  # device tensors, read once at the end
    # 1 from the first non-finite loss or gradient norm on. Between the host's looks, the fused
    # optimizers read it as GradScaler's found_inf and skip their step on the device themselves.
    nonfinite = torch.zeros((), device=y.device)
    optimizer.found_inf = nonfinite if sync_every > 1 else None

    stop_tag = None
    for i in tqdm(range(-(-len(y) // bs)), leave=False, disable=verbose < 2, desc="batches"):
        if stop.requested:
            stop_tag = stop.tag
            break
        if time.perf_counter() > deadline:
            stop_tag = utils.TIMEOUT()
            break
        batch = order[i * bs:(i + 1) * bs]
        logits = model(x[batch])
        loss = F.cross_entropy(logits, y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The true norm, before clipping: get_total_norm without its per-call regrouping (70 us a step).
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        losses.append(loss.detach())
        norms.append(norm)
        predictions.append(logits.detach().argmax(1))
        nonfinite.logical_or_((loss + norm).isfinite().logical_not_())  # both are >= 0: finite iff both are
        # Sync point, every sync_every batches: never step with a non-finite loss or gradient.
        if (i + 1) % sync_every == 0 and nonfinite.item():
            break
        if opts["grad_clipping"]:
            nn.utils.clip_grads_with_norm_(params, opts["grad_clipping"], norm)
        optimizer.step()

    if not losses:
        return None, stop_tag
    # Sync point, once per epoch: the epoch's statistics, read to the host together.
    losses, norms = torch.stack(losses).tolist(), torch.stack(norms).tolist()
    bad = utils.nonfinite_step(losses, norms)
    if bad:  # the batches after the bad one took no step: they are not part of the epoch
        stop_tag, losses, norms = bad[1], losses[:bad[0] + 1], norms[:bad[0] + 1]
    predictions = torch.cat(predictions[:len(losses)])
    seen = len(predictions)
    stats = metric_values(predictions, y[order[:seen]], "train")
    sizes = [bs] * (len(losses) - 1) + [seen - bs * (len(losses) - 1)]
    mean, std, low, high = utils.describe(norms)
    stats.update({
        "train/loss": sum(v * s for v, s in zip(losses, sizes)) / seen,
        "train/grad_norm_mean": mean, "train/grad_norm_std": std,
        "train/grad_norm_min": low, "train/grad_norm_max": high,
        "train/batches": len(losses),
        "train/time": time.perf_counter() - start,
    })
    return stats, stop_tag


# ----------------------------------------------------------------------------------------------
# Evaluation


def metric_values(predictions: torch.Tensor, targets: torch.Tensor, split: str) -> dict[str, float]:
    accuracy = multiclass_accuracy(predictions, targets)
    f1 = multiclass_f1_score(predictions, targets, num_classes=NUM_CLASSES, average="macro")
    accuracy, f1 = torch.stack([accuracy, f1]).tolist()  # sync point: once per split and epoch
    return {f"{split}/accuracy": accuracy, f"{split}/f1": f1}


@torch.inference_mode()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, split: str) -> dict[str, float]:
    model.eval()
    start = time.perf_counter()
    predictions = torch.cat([model(x[i:i + EVAL_BATCH]).argmax(1) for i in range(0, len(y), EVAL_BATCH)])
    return {**metric_values(predictions, y, split), f"{split}/time": time.perf_counter() - start}


def baselines(data: dict) -> dict[str, float]:
    """What guessing scores on each split, computed once from the labels."""
    counts = {split: torch.bincount(y, minlength=NUM_CLASSES).tolist() for split, (_, y) in data.items()}
    row = {}
    for split, c in counts.items():
        for name, values in (("random", utils.random_baseline(c)),
                             ("most_probable", utils.most_probable_baseline(counts["train"], c))):
            row.update({f"{split}/{name}_{metric}": v for metric, v in values.items()})
    return row


# ----------------------------------------------------------------------------------------------
# The run: train() loads the data, builds the model, then trains and evaluates epoch after epoch.
# `record` (runs.py) starts W&B, logs and saves each epoch as it ends, and writes the run's end.


def seed_everything(seed: int) -> None:
    """torch, and the generators a fork's own code may draw from (augmentation with numpy or random)."""
    torch.manual_seed(seed)
    np.random.seed([seed % 2**32, seed // 2**32])  # numpy's legacy seed takes 32-bit words
    random.seed(seed)


def save_checkpoint(path: Path, epoch, model, optimizer, generator, history, tags) -> None:
    """Everything a resumed run needs to go on as if it had never stopped, written whole or not at all.
    Only tensors and plain values, so that load_checkpoint can refuse anything else."""
    numpy_rng = np.random.get_state(legacy=False)
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
             "python_rng": random.getstate(),
             "numpy_rng": {**numpy_rng, "state": {"key": torch.from_numpy(numpy_rng["state"]["key"].astype(np.int64)),
                                                  "pos": numpy_rng["state"]["pos"]}},
             "history": history, "tags": tags}
    utils.atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, device: torch.device, model, optimizer, generator) -> tuple[int, list, list]:
    """Restores what save_checkpoint wrote; returns the epoch it was written after, the history and the
    tags. weights_only: a checkpoint found on shared storage is data, and must not run code as it loads."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        numpy_rng = state["numpy_rng"]
        np.random.set_state({**numpy_rng, "state": {"key": numpy_rng["state"]["key"].numpy().astype(np.uint32),
                                                    "pos": numpy_rng["state"]["pos"]}})
    except pickle.UnpicklingError as e:  # what weights_only refuses: the file would run code as it loads
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it calls {found[1]}" if found else "objects that run code on loading"
        raise utils.StartError(f"the checkpoint {path} holds more than tensors and plain values ({what}), so it "
                               "was not loaded. A checkpoint this code wrote never does: delete the file (the run "
                               "then trains again from its start), and find out what wrote it.") from None
    except Exception as e:  # truncated, empty, another model's: the message names it
        reason = str(e).strip().split(". ")[0] or type(e).__name__
        raise utils.StartError(f"the checkpoint {path} could not be loaded ({reason}). It may be truncated, "
                               "written by another version of the code, or not a checkpoint at all; delete it "
                               "to train this run again from its start.") from None
    return state["epoch"], state["history"], state["tags"]


def train(opts: dict, folder: Path | None, resume: bool, record: runs.Record, stop: StopRequest) -> None:
    device = torch.device(opts["device"])
    data = load_mnist(opts["data_path"], device)
    if opts["val_size"] >= len(data["train"][1]):
        raise utils.UsageError(f"argument --val_size: {opts['val_size']} leaves no training data "
                               f"(the training set has {len(data['train'][1])} samples)")
    data["train"], data["val"] = hold_out(*data["train"], opts["val_size"])
    guesses = baselines(data)

    seed_everything(opts["seed"])
    generator = torch.Generator().manual_seed(opts["seed"])
    try:
        model = build_model(opts["hidden"], opts["dropout"]).to(device)
    except (RuntimeError, MemoryError) as e:  # CPU and CUDA allocators both raise RuntimeError
        asked = re.search(r"allocate ([0-9.]+ ?[A-Za-z]+)", str(e))
        raise utils.StartError(f"the model does not fit in the memory of {device}" + (
            f" (one of its tensors needs {asked[1]})" if asked else "") + "; make it smaller (--hidden).") from None
    if opts["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"], fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                                    weight_decay=opts["weight_decay"], fused=True)
    checkpoint = folder / "checkpoint.pt" if folder else None
    done, history, tags, unsaved = 0, [], [], None
    if resume and checkpoint and checkpoint.exists():
        done, history, tags = load_checkpoint(checkpoint, device, model, optimizer, generator)
    # What this data and model are, once: W&B's config and results.json keep it, not every epoch's row.
    record.start({**guesses, **{f"data/{split}_size": len(y) for split, (_, y) in data.items()},
                  "model/parameters": sum(p.numel() for p in model.parameters())})

    sync_every = sync_interval(device)
    for epoch in tqdm(range(done + 1, opts["epochs"] + 1), disable=opts["verbose"] < 1, desc="epochs"):
        record.epoch_started(epoch)
        stats, stop_tag = train_epoch(model, optimizer, *data["train"], opts, generator, stop, sync_every,
                                      opts["verbose"])
        if stats is None or stop_tag in (utils.PREEMPTED(), utils.STOPPED()):  # trained again on resume
            utils.add_tags(tags, [stop_tag])
            break
        row = {"epoch": epoch, **stats}
        if stop_tag is None:  # a stopped epoch is not evaluated: its model is not the epoch's end
            for split in ("val", "test"):
                row.update(evaluate(model, *data[split], split))
            row.update({f"gap/{m}": row[f"train/{m}"] - row[f"test/{m}"] for m in utils.METRICS})
            epoch_time = sum(row[f"{s}/time"] for s in utils.SPLITS)
            if opts["epoch_timeout"] and epoch_time > 60 * opts["epoch_timeout"]:
                stop_tag = utils.TIMEOUT()
        history.append(row)
        utils.add_tags(tags, utils.gradient_tags(row["train/grad_norm_min"], row["train/grad_norm_max"],
                                                 row["train/grad_norm_std"], opts)
                       + utils.overfitting_tags(row, opts["overfitting_threshold"], utils.OVERFITTING_LEARNING))
        record.log(row, tags)
        if opts["verbose"]:
            tqdm.write(summary_line(row, opts["epochs"]))
        whole = "test/accuracy" in row  # trained to its end and evaluated
        if checkpoint and opts["checkpoint_every"] and whole and epoch % opts["checkpoint_every"] == 0:
            unsaved = utils.write_failure(checkpoint, lambda: save_checkpoint(checkpoint, epoch, model, optimizer,
                                                                              generator, history, tags))
            stop_tag = utils.SAVE_FAILED() if unsaved else stop_tag  # the previous checkpoint stays whole
        stop_tag = stop_tag or stop.tag  # a signal during evaluation or saving: stop now, the epoch is whole
        if stop_tag:
            utils.add_tags(tags, [stop_tag])
            break
    else:
        tags.insert(0, utils.SUCCESS())

    evaluated = [row for row in history if "test/accuracy" in row]
    if evaluated:
        last = {**guesses, **evaluated[-1]}  # the guessing detectors compare with the baselines
        utils.add_tags(tags, utils.overfitting_tags(last, opts["overfitting_threshold"], utils.OVERFITTING_END)
                       + utils.guessing_tags(last, "random", opts["rnd_threshold"], utils.RANDOM_GUESSING)
                       + utils.guessing_tags(last, "most_probable", opts["mp_threshold"],
                                             utils.MOST_PROBABLE_GUESSING))
    if opts["save"] and not unsaved:
        model_file = folder / "model.pt"
        unsaved = utils.write_failure(model_file, lambda: utils.atomic_write(
            model_file, lambda f: torch.save(model.state_dict(), f)))
        utils.add_tags(tags, [utils.SAVE_FAILED()] if unsaved else [])
    record.finish(tags, unsaved)


def train_reporting_bugs(opts: dict, folder: Path | None, resume: bool, record: runs.Record,
                         stop: StopRequest) -> None:
    """train(), with an exception raised in it (a bug in the training code) made the run's end: its
    traceback on screen, the run Failed, and no advice to resume, which would only raise it again."""
    try:
        train(opts, folder, resume, record, stop)
    except (utils.StartError, utils.RunEnded):  # the run could not start, or its end is written
        raise
    except Exception:
        traceback.print_exc()
        record.finish(record.tags + [utils.EXCEPTION()], "the training code raised an exception (its traceback is "
                      "above); fix it, then start the run again")


def summary_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}  loss {row['train/loss']:.4f}"
    for metric in utils.METRICS:
        line += f"  {metric} " + " ".join(f"{s} {row[f'{s}/{metric}']:.4f}"
                                          for s in utils.SPLITS if f"{s}/{metric}" in row)
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
        return str(e).splitlines()[0].split(". ")[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = utils.get_arg_parser()
    opts = vars(parser.parse_args(argv))
    opts["seed"] = utils.resolve_seed(opts["seed"])
    opts["device"] = opts["device"] or os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if why := device_error(opts["device"]):
        parser.error(f"argument --device: {opts['device']!r} cannot be used here ({why})")
    config = {**opts, "group": utils.generate_name(opts)}

    reasons = utils.prune_hyperparameters(opts, parser)
    for reason in reasons:
        print(f"Warning: irrelevant hyper-parameters: {reason}", file=sys.stderr)
    keep = opts["save"] or opts["checkpoint_every"]  # checkpoints live in the run folder too
    # Under `wandb agent` a run id that left a checkpoint is a preempted run W&B has re-queued.
    resume = keep and (opts["resume"] or bool(os.environ.get("WANDB_RUN_ID")))
    folder, history, lock = None, [], None
    try:
        if keep:
            folder, history, lock = runs.run_folder(opts, config, resume)
        guard = watch.Channel()
        record = runs.Record(opts, config, folder, history, guard)
        if reasons and opts["abort_irrelevant"]:
            record.start({})
            record.finish([utils.IRRELEVANT()])
            # Failed in W&B and tagged, but it did what was asked (declined to train): exit 0, so W&B's
            # agent does not take a sparse sweep's pruned runs for a broken setup (its flapping checks).
            return 0
        with StopRequest(lambda tag: guard.send("stopping", tag=tag)) as stop:
            train_reporting_bugs(opts, folder, resume, record, stop)
        return record.status
    except utils.UsageError as e:  # a command-line value the data rules out
        parser.error(str(e))
    except utils.StartError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except utils.RunEnded:  # its end is written: results.json could not be saved
        return record.status
    finally:
        runs.remove_if_unstarted(folder)
        if lock is not None:  # the run has ended: its folder is free for the next process
            os.close(lock)


if __name__ == "__main__":
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named semaphore, which a killed process leaks
    # Outside the training loop a stop signal changes nothing: the run's end is written whole and the
    # exit status is the run's (a Ctrl+C key held down, an agent's late SIGTERM, one forwarded by the guard).
    for signum in utils.STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(main())
