"""Train an MLP on MNIST with a hand-written loop; group and tag the run in Weights & Biases.

    python main.py --data_path ../shared/data                      # standalone, summary on screen
    python main.py --data_path ../shared/data --save yes           # + model and results under outputs/
    python main.py --data_path ../shared/data --wandb_project mnist
    WANDB_MODE=offline python main.py --wandb_project mnist        # upload later with `wandb sync`
    wandb agent SWEEP_ID                                           # runs `python main.py --key=value ...`

Every option: `python main.py --help`. Exit status: 0 when the run ended without an error tag,
1 when it ended with one (or could not start), 2 for an invalid command line.
"""

import math
import os
import secrets
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import utils

if __name__ == "__main__":
    # Parse before torch loads (2 s): --help and usage errors answer at once. main() parses again.
    utils.get_arg_parser().parse_args()

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # torcheval 0.0.7 still decorates with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from torcheval.metrics.functional import multiclass_accuracy, multiclass_f1_score
from torchvision.datasets import MNIST
from tqdm import tqdm

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


class StartError(Exception):
    """The run cannot start (no data, no place to save, no W&B); the message says what to do."""


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
                raise StartError(f"MNIST is not in {raw} ({', '.join(missing)} missing) and could not be "
                                 f"downloaded ({reason}).\n{how}") from None
            raise StartError(f"the MNIST files in {raw} could not be read ({reason}); they may be truncated "
                             f"or corrupted.\n{how}") from None
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
    """The first Ctrl+C (SIGINT) asks the loop to stop at the next batch; a second one acts as usual."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nStopping at the next batch (Ctrl+C again to quit at once).", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


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
            stop_tag = utils.USER_ABORT()
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
# Recording: W&B (optional) and the run folder (--save yes)


def start_wandb(opts: dict, config: dict):
    if not (opts["wandb_project"] or os.environ.get("WANDB_SWEEP_ID")):
        return None
    import wandb  # only runs that log pay for its import

    try:  # under `wandb agent` (WANDB_SWEEP_ID set) the project comes from the sweep
        return wandb.init(project=opts["wandb_project"], group=config["group"], config=config)
    except wandb.Error as e:
        raise StartError(f"W&B could not start: {e}\nLog in with `wandb login`, or run with "
                         "WANDB_MODE=offline (upload later with `wandb sync`).") from None


def check_writable(path: str) -> None:
    """Fail before training, not after it, when results could not be saved."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise StartError(f"cannot save under --output_path {path}: {e.strerror or e}") from None


def run_folder(opts: dict, config: dict, run) -> Path | None:
    if not opts["save"]:
        return None
    folder = Path(opts["output_path"], config["group"], run.id if run else secrets.token_hex(4))
    folder.mkdir(parents=True, exist_ok=True)
    utils.write_json(folder / "config.json", config)
    return folder


def save_results(folder: Path | None, config: dict, run, history: list, tags: list, status: str) -> None:
    if folder:
        utils.write_json(folder / "results.json", {
            "history": history, "tags": tags, "status": status, "group": config["group"],
            "seed": config["seed"], "wandb_run_path": run.path if run and not run.disabled else None})


def finish(opts, config, run, folder, history, tags) -> int:
    failed = utils.failed(tags)
    status = "failed" if failed else "finished"
    save_results(folder, config, run, history, tags, status)
    if run:
        run.summary["seed"] = config["seed"]
        run.tags = tuple(tags)
        run.finish(exit_code=int(failed))
    if opts["verbose"]:
        print(f"Run {status}. Group {config['group']}, seed {config['seed']}. Tags: {', '.join(tags) or 'none'}")
        if folder:
            print(f"Saved in {folder}")
    return int(failed)


def summary_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}  loss {row['train/loss']:.4f}"
    for metric in utils.METRICS:
        line += f"  {metric} " + " ".join(f"{s} {row[f'{s}/{metric}']:.4f}"
                                          for s in utils.SPLITS if f"{s}/{metric}" in row)
    return line + f"  ({sum(v for k, v in row.items() if k.endswith('/time')):.1f} s)"


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = utils.get_arg_parser()
    opts = vars(parser.parse_args(argv))
    opts["seed"] = utils.resolve_seed(opts["seed"])
    device = opts["device"] or os.environ.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"argument --device: {device!r} cannot be used here ({str(e).splitlines()[0].split('. ')[0]})")
    opts["device"] = device
    config = {**opts, "group": utils.generate_name(opts)}

    reasons = utils.prune_hyperparameters(opts, parser)
    for reason in reasons:
        print(f"Warning: irrelevant hyper-parameters: {reason}", file=sys.stderr)
    try:
        if opts["save"]:
            check_writable(opts["output_path"])
        if reasons and opts["abort_irrelevant"]:
            run = start_wandb(opts, config)
            return finish(opts, config, run, run_folder(opts, config, run), [], [utils.IRRELEVANT()])
        data = load_mnist(opts["data_path"], torch.device(device))
        if opts["val_size"] >= len(data["train"][1]):
            parser.error(f"argument --val_size: {opts['val_size']} leaves no training data "
                         f"(the training set has {len(data['train'][1])} samples)")
        run = start_wandb(opts, config)
    except StartError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    data["train"], data["val"] = hold_out(*data["train"], opts["val_size"])
    guesses = baselines(data)

    torch.manual_seed(opts["seed"])
    generator = torch.Generator().manual_seed(opts["seed"])
    model = build_model(opts["hidden"], opts["dropout"]).to(device)
    if opts["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"], fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=opts["momentum"],
                                    weight_decay=opts["weight_decay"], fused=True)

    folder = run_folder(opts, config, run)
    sync_every = sync_interval(torch.device(device))
    tags, history = [], []
    with StopRequest() as stop:
        for epoch in tqdm(range(1, opts["epochs"] + 1), disable=opts["verbose"] < 1, desc="epochs"):
            stats, stop_tag = train_epoch(model, optimizer, *data["train"], opts, generator, stop, sync_every,
                                          opts["verbose"])
            if stats is None:
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
            row.update(guesses)
            history.append(row)
            utils.add_tags(tags, utils.gradient_tags(row["train/grad_norm_min"], row["train/grad_norm_max"],
                                                     row["train/grad_norm_std"], opts)
                           + utils.overfitting_tags(row, opts["overfitting_threshold"], utils.OVERFITTING_LEARNING))
            if run:
                run.log(row)
            save_results(folder, config, run, history, tags, "running")
            if opts["verbose"]:
                tqdm.write(summary_line(row, opts["epochs"]))
            if stop_tag:
                utils.add_tags(tags, [stop_tag])
                break
        else:
            tags.insert(0, utils.SUCCESS())

    evaluated = [row for row in history if "test/accuracy" in row]
    if evaluated:
        last = evaluated[-1]
        utils.add_tags(tags, utils.overfitting_tags(last, opts["overfitting_threshold"], utils.OVERFITTING_END)
                       + utils.guessing_tags(last, "random", opts["rnd_threshold"], utils.RANDOM_GUESSING)
                       + utils.guessing_tags(last, "most_probable", opts["mp_threshold"],
                                             utils.MOST_PROBABLE_GUESSING))
    if opts["save"]:
        utils.atomic_write(folder / "model.pt", lambda f: torch.save(model.state_dict(), f))
    return finish(opts, config, run, folder, history, tags)


if __name__ == "__main__":
    sys.exit(main())
