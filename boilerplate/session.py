"""One run, from the command line to its end, around an experiment's parts (main.py's Experiment):
the options checked, the run folder owned or resumed, the data loaded and checked, the model built and
one batch tried before the first epoch, then epoch after epoch: train (the experiment's loop), evaluate,
detect, log, checkpoint. `record` (runs.py) starts W&B, logs and saves each epoch as it ends, and writes
the run's end; the run's exit status is the answer of main()."""

import math
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch
from tqdm import tqdm

import utils

from . import checkpoints, devices, distributed, options, provenance, runs, wandb_start, watch
from .batches import Data, batches_of, hold_out
from .errors import RunEnded, StartError, UsageError, described
from .files import atomic_write, write_failure
from .metrics import baselines, metric_values
from .steps import Steps

# --compile yes compiles the model as the first batch goes through it: a failure there may be torch's.
COMPILED = "; with --compile yes torch.compile compiles the model in this batch: --compile no tells if it is at fault"


class Experiment(NamedTuple):
    """An experiment's parts, which the run calls (main.py says what each takes and gives)."""

    get_parser: Callable[[], options.Parser]
    load_data: Callable[..., Data]
    build_model: Callable[..., torch.nn.Module]
    build_optimizer: Callable[..., torch.optim.Optimizer]
    build_schedule: Callable[..., Any]
    train_epoch: Callable[..., None]
    evaluate: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    loss_of: Callable[..., torch.Tensor]
    predictions_of: Callable[[torch.Tensor], torch.Tensor]


def main(experiment: Experiment, argv: list[str] | None = None, link: watch.Link | None = None) -> int:
    """One run; its exit status. `link` hears stop signals (a new one, and its handlers restored at
    the end, for a caller in this process)."""
    link = link or watch.Link(watch.Channel())
    with link:
        return run(experiment, argv, link)


def exit(status: int) -> NoReturn:
    """The end of `python main.py`: W&B's services ended, then the process, with the run's status."""
    wandb_start.exit(status)


def run(experiment: Experiment, argv: list[str] | None, link: watch.Link) -> int:
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named semaphore, which a killed process leaks
    parser = experiment.get_parser()
    args = parser.parse_args(argv)
    opts = vars(args)  # the same values, by name, for the machinery (a view: a change shows in both)
    any_seed = args.seed == options.RANDOM_SEED  # --resume yes then continues a stopped run of any seed
    args.seed = options.resolve_seed(args.seed)
    args.device = distributed.device(devices.chosen(args.device))
    if why := devices.device_error(args.device):
        parser.error(f"argument --device: {args.device!r} cannot be used here ({why})")
    if args.precision == "bf16" and (why := devices.bf16_error(torch.device(args.device))):
        parser.error(f"argument --precision: bf16 cannot run on {args.device} ({why}); use fp32")
    devices.use_the_allowed_cores()
    try:
        distributed.start(torch.device(args.device), args.epoch_timeout)
    except StartError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    owner = distributed.rank() == 0  # under torchrun, rank 0 alone owns the run: its folder, results and W&B
    hyperparameters = options.hyperparameter_names(parser)
    config = {**opts, "group": utils.generate_name(opts, hyperparameters)}
    if not owner:  # one screen for the run: rank 0's
        args.verbose = 0

    reasons = utils.prune_hyperparameters(opts, parser)
    for reason in reasons if owner else []:
        print(f"Warning: irrelevant hyper-parameters: {reason}", file=sys.stderr)
    if owner and args.log_model == "best" and args.monitor == utils.NO_MONITOR:
        print(
            "Warning: --log_model best logs the model at each better --monitor, and --monitor none keeps no best "
            "epoch: no model will be logged (--log_model end logs the last)",
            file=sys.stderr,
        )
    # Checkpoints live in the run folder too. --resume yes looks for the stopped run even where this sitting
    # keeps nothing (--save no --checkpoint_every 0): an earlier sitting may have left one.
    keep = owner and (args.save or args.checkpoint_every or args.resume)
    # torchrun starts every rank again after one failed (--max-restarts) and when a machine joins the job
    # (--nnodes MIN:MAX): the job continues the run it stopped, as torch asks of a script started again, where
    # it would train another from scratch beside the one it left. Its run is the one its job id left.
    restart, most = distributed.restarts()
    job = runs.torchrun_job()
    continues = owner and (restart > 0 or job is not None) and bool(args.checkpoint_every)
    if restart and owner:
        what = (
            "it continues the run it stopped, if it left one"
            if continues
            else "it trains a new run (--checkpoint_every 0: no checkpoint)"
        )
        print(f"torchrun restarted the job ({restart} of {most} restarts): {what}", file=sys.stderr)
    asked = "--resume yes"  # what continues a run, as messages name it
    if continues and not args.resume:
        asked = "torchrun's restart" if restart else f"torchrun's job {job}"
    # Under `wandb agent` a run id that left a checkpoint is a preempted run W&B has re-queued.
    asked_for = args.resume or bool(os.environ.get("WANDB_RUN_ID"))
    resume = keep and (asked_for or continues)
    by_job = continues and not asked_for  # torchrun's own start: the run its job left, if it left one
    folder, previous, lock, ranks = None, None, None, distributed.Word()
    try:
        if keep:
            with link.deferred():  # the folder is made and owned whole, or not at all
                folder, previous, lock = runs.run_folder(
                    opts,
                    config,
                    resume,
                    any_seed and (args.resume or continues),
                    hyperparameters,
                    asked,
                    job=job if by_job else None,
                    quiet=by_job and not restart,  # a job's first start, most likely: nothing to say
                )
                link.unstarted = folder
                if previous and by_job and not restart:
                    print(
                        f"torchrun started job {job} again (a machine joined it, or it was re-queued): "
                        "it continues the run it stopped",
                        file=sys.stderr,
                    )
        if previous:  # a run resumed: its own seed (another than drawn, with --seed random)
            args.seed = config["seed"] = previous["seed"]
        word = ranks.tell({"seed": args.seed})  # the other ranks train with rank 0's seed, or end with it
        if "status" in word:
            return word["status"]
        args.seed = config["seed"] = word["seed"]
        record = runs.Record(opts, config, folder, previous["history"] if previous else [], link, owner)
        record.constants = previous.get("constants") or {} if previous else {}  # a resumed run's, till it starts
        record.prepare_wandb()
        if reasons and args.abort_irrelevant:
            with link.deferred():
                record.start({})
                link.begun()
            record.finish([utils.IRRELEVANT()])
            # Failed in W&B and tagged, but it did what was asked (declined to train): exit 0, so W&B's
            # agent does not take a sparse sweep's pruned runs for a broken setup (its flapping checks).
            return 0
        train_reporting_bugs(experiment, args, folder, resume, record, link)
        return record.status
    except runs.AlreadyEnded as ended:
        results = ended.results
        print(
            f"{asked}: this run has ended already, in {ended.folder}: {results['status']} after "
            f"{len(results['history'])} epochs, tags {', '.join(results['tags']) or 'none'}. Nothing to train"
            + (" (without --resume yes it trains again)." if asked == "--resume yes" else "."),
            file=sys.stderr,
        )
        return ranks.tell({"status": int(results["status"] != "finished")})["status"]
    except UsageError as e:  # a command-line value the data rules out
        parser.error(str(e))
    except StartError as e:
        print(f"Error: {e}", file=sys.stderr)
        return ranks.tell({"status": 1})["status"]
    except RunEnded:  # its end is written: results.json could not be saved
        return record.status
    finally:
        link.close()  # what follows tidies up whatever ended the run: no stop interrupts it
        if owner:
            ranks.tell({"status": 1})  # the other ranks wait for no word that will never come
        distributed.stop()
        runs.remove_if_unstarted(folder)
        if lock is not None:  # the run has ended: its folder is free for the next process
            os.close(lock)


def train_reporting_bugs(
    experiment: Experiment, args: Any, folder: Path | None, resume: bool, record: runs.Record, stop: watch.Link
) -> None:
    """train(), with an exception raised in it (a bug in the training code) made the run's end: its
    traceback on screen, the run Failed, and no advice to resume, which would only raise it again."""
    try:
        train(experiment, args, folder, resume, record, stop)
    except (StartError, RunEnded):  # the run could not start, or its end is written
        raise
    except Exception as e:  # noqa: BLE001 (a bug in the training code: shown whole, and the run's end written)
        if peer := e if isinstance(e, distributed.PeerLost) else distributed.gradients_lost():  # torchrun's
            # Before the run began (rank 0's start refused, a rank dead loading the data) there is nothing to resume
            when = "; resumable" if stop.phase != stop.EARLY else " before the run began"
            record.finish(record.tags + [utils.TIMEOUT() if peer.hung else utils.CRASHED()], f"{peer}{when}")
            return
        if (record.run or wandb_start.stuck) and wandb_start.lost_under(e):  # W&B's fault, under a fork's call
            hung = ", W&B having hung in this process before" if wandb_start.stuck else ""
            record.lost_wandb(f"your training code called it{hung}", e, "The run stops here, resumable")
            record.finish(record.tags + [utils.WANDB_LOST()])
            return
        if stop.requested:  # a job's signal reaches every process of it: a compiler or helper the code ran, killed
            record.finish(
                record.tags + [stop.tag],
                f"after the stop signal the training code raised {described(e)}, as a process it ran (torch.compile's "
                "compiler, say) was stopped by the same signal; resumable",
            )
            return
        traceback.print_exc()
        record.finish(
            record.tags + [utils.EXCEPTION()],
            "the training code raised an exception (its traceback is above); fix it, then start the run again",
        )


def prepare_data(experiment: Experiment, args: Any) -> tuple[Data, dict]:
    """The experiment's data, a validation split held out where it has none, each split's batches on
    the device, and its labels checked against the classes."""
    description = experiment.load_data(args)
    splits, classes = description.splits, len(description.classes)
    if "val" not in splits:
        if args.val_size >= len(splits["train"]):
            raise UsageError(
                f"argument --val_size: {args.val_size} leaves no training data "
                f"(the training set has {len(splits['train'])} samples)"
            )
        splits["train"], splits["val"] = hold_out(splits["train"], args.val_size)
    data = {split: batches_of(splits[split], torch.device(args.device), args.workers) for split in utils.SPLITS}
    for split, batches in data.items():
        labels = batches.labels()
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
            raise StartError(
                f"the {split} labels go from {int(labels.min())} to {int(labels.max())}, "
                f"outside the data's {classes} classes 0 to {classes - 1} (load_data says "
                f"{description.classes})."
            )
    return description, data


def train(
    experiment: Experiment, args: Any, folder: Path | None, resume: bool, record: runs.Record, stop: watch.Link
) -> None:
    opts, device = vars(args), torch.device(args.device)
    description, data = prepare_data(experiment, args)
    distributed.wait_for_rank_0()  # which loads the data only once past W&B's login prompt
    distributed.check_shares(len(data["train"]), args.batch_size, {split: len(b) for split, b in data.items()})
    classes = len(description.classes)
    guesses = baselines({split: batches.labels() for split, batches in data.items()}, classes)

    checkpoints.seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        model = experiment.build_model(args, description).to(device)
    except (torch.OutOfMemoryError, MemoryError) as e:  # an accelerator's allocator, or Python's
        raise StartError(
            f"the model does not fit in the memory of {device} ({described(e)}); make it smaller."
        ) from None
    except RuntimeError as e:  # the CPU's allocator has no type of its own: its message says "can't allocate memory"
        raise StartError(f"the model could not be built on {device} ({described(e)})") from None
    if args.init_from:  # before the optimizer: it starts from these weights
        checkpoints.load_weights(model, Path(args.init_from), device)
    if args.compile:
        # In place (nn.Module.compile, not torch.compile(model)): the weights keep their names, so model.pt
        # loads into the model uncompiled. Static shapes: torch's automatic dynamic shapes would switch to
        # other kernels at the epoch's first shorter batch, and a resumed run would round otherwise than one
        # never stopped. A reset first: an earlier run in this process (a notebook) leaves no graph behind.
        torch.compiler.reset()
        model.compile(dynamic=False)
    optimizer = experiment.build_optimizer(args, model)
    batches = -(-len(data["train"]) // args.batch_size)
    schedule = experiment.build_schedule(args, optimizer, args.epochs * -(-batches // args.accumulate))
    # What a checkpoint keeps and a resume restores (state_dict or a generator's state): a GradScaler or
    # an EMA of the weights a fork adds goes here too, by a name of its own.
    stateful = {"model": model, "optimizer": optimizer, "generator": generator}
    if schedule is not None:
        stateful["schedule"] = schedule
    checkpoint = folder / "checkpoint.pt" if folder else None
    done, history, tags, unsaved = 0, [], [], None
    if resume and checkpoint and checkpoint.exists():
        done, history, tags = checkpoints.load(checkpoint, stateful)
    if distributed.world() > 1:  # every rank starts from rank 0's state: a resumed run's, or its first
        done, history, tags = distributed.restored(checkpoints.snapshot(done, stateful, history, tags), stateful)
    # Under torchrun the training loop sees the model wrapped by DistributedDataParallel, which averages the
    # ranks' gradients in backward(); evaluation and saving see the model itself.
    trained = distributed.wrapped(model)
    check_one_batch(experiment, model, data["train"], args, description, guesses)
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
                "torch/processes": distributed.world(),  # torchrun's ranks: not a hyper-parameter (the same experiment)
                "code/version": provenance.code_version(experiment),
            }
        )
        distributed.wait_for_rank_0(stop)  # which has started W&B
        stop.begun()

    sync_every = devices.sync_interval(device)
    # --verbose 1 (the default): tqdm draws the bar on a terminal only (disable=None), so that a log file
    # (SLURM's, nohup's, `> train.log 2>&1`) gets the epoch lines, not a bar redrawn with carriage returns.
    # --verbose 2 asks for the bars of the epochs and the batches wherever the output goes (`tail -f` a log).
    bar = {0: True, 1: None, 2: False}[args.verbose]
    for epoch in tqdm(range(done + 1, args.epochs + 1), disable=bar, desc="epochs"):
        record.epoch_started(epoch)
        deadline = time.perf_counter() + 60 * args.epoch_timeout if args.epoch_timeout else math.inf
        steps = Steps(
            data["train"],
            args.batch_size,
            generator,
            trained,
            optimizer,
            stop,
            epoch=epoch,
            accumulate=args.accumulate,
            precision=args.precision,
            deadline=deadline,
            sync_every=sync_every,
            predictions_of=experiment.predictions_of,
            progress=args.verbose >= 2,
        )
        experiment.train_epoch(trained, optimizer, schedule, steps, args)
        stats, stop_tag = steps.end()
        final = epoch == args.epochs and stats is not None and stop_tag is None
        if final:  # every batch is trained: the run's work is done, and a stop changes nothing now
            stop.close()
        if stats is None or stop_tag in (utils.PREEMPTED(), utils.STOPPED()):  # trained again on resume
            utils.add_tags(tags, [stop_tag])
            break
        # "evaluated": trained to its end and evaluated, as W&B's history holds it (and a resume counts it)
        row = {"epoch": epoch, **stats, "train/lr": optimizer.param_groups[0]["lr"], "evaluated": stop_tag is None}
        if stop_tag is None:  # a stopped epoch is not evaluated: its model is not the epoch's end
            for split in ("val", "test"):
                row.update(evaluate(experiment, model, data[split], split, classes, args))
            row.update({f"gap/{m}": row[f"train/{m}"] - row[f"test/{m}"] for m in utils.METRIC_NAMES})
            epoch_time = sum(row[f"{s}/time"] for s in utils.SPLITS)
            if args.epoch_timeout and epoch_time > 60 * args.epoch_timeout and stop.resumed < steps.start:
                stop_tag = utils.TIMEOUT()
        history.append(row)
        utils.add_tags(
            tags,
            utils.gradient_tags(
                row["train/grad_norm_min"], row["train/grad_norm_max"], row["train/grad_norm_std"], opts
            )
            + utils.overfitting_tags(row, args.overfitting_threshold, utils.OVERFITTING_LEARNING),
        )
        record.log(row, tags)
        if args.verbose:  # one write, newline included: runs sharing one output (parallel agents, -u) never split it
            tqdm.write(summary_line(row, args.epochs) + "\n", end="")
        better = row["evaluated"] and utils.best_epoch(history, args.monitor) is row
        if better and args.save and folder:
            unsaved = save_weights(folder / "best.pt", model)
            stop_tag = utils.SAVE_FAILED() if unsaved else stop_tag
        if better and args.log_model == "best" and record.owner:
            log_model(record, model, epoch, ["best", "latest"])
        early = not final and stop_tag is None and utils.patience_over(history, args.monitor, args.patience)
        if early:  # the run's work is done: a stop changes nothing now
            stop.close()
        due = checkpoint and args.checkpoint_every and row["evaluated"] and epoch % args.checkpoint_every == 0
        if due and not unsaved:
            unsaved = write_failure(
                checkpoint,
                lambda: checkpoints.save(checkpoint, epoch, stateful, history, tags),  # noqa: B023 (called at once)
            )
            stop_tag = utils.SAVE_FAILED() if unsaved else stop_tag  # the previous checkpoint stays whole
        # A signal in evaluation or saving: the epoch is whole, and the run stops after it.
        stop_tag = stop_tag or (None if final or early else stop.tag)
        stop_tag = distributed.first(stop_tag)  # every rank stops after this epoch if any does (rank 0's reason first)
        if stop_tag or early:
            utils.add_tags(tags, [stop_tag or utils.EARLY_STOPPED()])
            break
    else:
        tags.insert(0, utils.SUCCESS())

    evaluated = [row for row in history if row["evaluated"]]
    if evaluated:
        last = {**guesses, **evaluated[-1]}  # the guessing detectors compare with the baselines
        utils.add_tags(
            tags,
            utils.overfitting_tags(last, args.overfitting_threshold, utils.OVERFITTING_END)
            + utils.guessing_tags(last, "random", args.rnd_threshold, utils.RANDOM_GUESSING)
            + utils.guessing_tags(last, "most_probable", args.mp_threshold, utils.MOST_PROBABLE_GUESSING),
        )
    if args.save and folder and not unsaved:
        unsaved = save_weights(folder / "model.pt", model)
        utils.add_tags(tags, [utils.SAVE_FAILED()] if unsaved else [])
    if args.log_model == "end" and evaluated and not utils.failed(tags) and record.owner:
        log_model(record, model, evaluated[-1]["epoch"], ["latest"])
    record.finish(tags, unsaved)


def save_weights(path: Path, model: torch.nn.Module) -> str | None:
    """The model's weights alone (its state_dict), whole or not at all; why not, when they could not be written."""
    return write_failure(path, lambda: atomic_write(path, lambda f: torch.save(model.state_dict(), f)))


def log_model(record: runs.Record, model: torch.nn.Module, epoch: int, aliases: list[str]) -> None:
    """The model's weights to W&B as an artifact (--log_model), from a file of their own."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save(model.state_dict(), path)
        record.log_model(path, epoch, aliases)


def evaluate(
    experiment: Experiment, model: torch.nn.Module, batches: Any, split: str, classes: int, args: Any
) -> dict[str, float]:
    """The experiment's evaluation of one split, scored by every metric of the table, its loss, and its time."""
    start = time.perf_counter()
    if distributed.world() == 1:
        predictions, labels, loss = experiment.evaluate(model, batches, split, args)
    else:  # each rank its share of the split; every rank then scores the whole
        share = batches.part(*distributed.bounds(len(batches)))
        predictions, labels, loss = experiment.evaluate(model, share, split, args)
        predictions, labels = distributed.gathered(predictions), distributed.gathered(labels)
        loss = distributed.total(loss.double().reshape(1) * len(share)) / len(batches)
    scores = metric_values(predictions, labels, split, classes)
    return {**scores, f"{split}/loss": float(loss), f"{split}/time": time.perf_counter() - start}


def check_one_batch(
    experiment: Experiment, model: torch.nn.Module, batches: Any, args: Any, description: Data, guesses: dict
) -> None:
    """Before the first epoch, one batch through the model, the loss, the metrics and every detector, so
    that a model that does not fit the data or a metric that cannot be computed fails in seconds with a
    clear message, not as a crash mid-run. It leaves the random generators and the model as they were."""
    device = next(model.parameters()).device
    predictions = values = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            model.eval()  # no dropout draw, no batch-norm update
            x, y = next(batches.batches(args.batch_size))
            with devices.autocast(args.precision, device):
                logits = model(x)
                loss = experiment.loss_of(logits, y, args)
            loss.backward()
            model.zero_grad(set_to_none=True)
            predictions = experiment.predictions_of(logits.detach())
            values = metric_values(predictions, y, "train", len(description.classes))
            row = {f"{split}/{key.split('/')[1]}": v for split in utils.SPLITS for key, v in values.items()}
            row.update({f"gap/{m}": 0.0 for m in utils.METRIC_NAMES}, **guesses)
            utils.gradient_tags(1.0, 1.0, 0.0, vars(args))
            utils.overfitting_tags(row, args.overfitting_threshold, utils.OVERFITTING_END)
            for baseline, tag in (("random", utils.RANDOM_GUESSING), ("most_probable", utils.MOST_PROBABLE_GUESSING)):
                utils.guessing_tags(row, baseline, 0.0, tag)
        except Exception as e:  # noqa: BLE001 (whatever a fork's model, loss or data raise: named to the user)
            scores = ""
            if predictions is not None and values is None and reads_scores(logits, y, len(description.classes)):
                scores = "; a metric of the model's scores needs predictions_of to return them"
            raise StartError(
                f"one batch through the model, the loss, the metrics and the detectors failed before training "
                f"({described(e)}). Check build_model against the data's description (one sample's "
                f"shape {description.input_shape}, {len(description.classes)} classes) and the metrics table "
                f"(utils.METRICS{scores}){COMPILED if args.compile else ''}; nothing was trained."
            ) from None


def reads_scores(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> bool:
    """Whether every metric computes from the model's scores (check_one_batch: it failed on predictions_of's)."""
    try:
        metric_values(logits.detach().float(), labels, "train", classes)
    except Exception:  # noqa: BLE001 (a metric's own error: the message names the first one)
        return False
    return True


def summary_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}  loss {row['train/loss']:.4f}"
    for metric in utils.METRIC_NAMES:
        line += f"  {metric} " + " ".join(
            f"{s} {row[f'{s}/{metric}']:.4f}" for s in utils.SPLITS if f"{s}/{metric}" in row
        )
    return line + f"  ({sum(v for k, v in row.items() if k.endswith('/time')):.1f} s)"
