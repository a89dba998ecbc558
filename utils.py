"""The design's own logic: the event detectors (pure functions over plain numbers, tested without
training), the tag table and its accumulation, the metrics table and its guessing baselines,
hyper-parameter pruning and W&B group naming. Nothing here imports torch or wandb: the guard uses
the tags before either is loaded.
"""

import argparse
import functools
import hashlib
import json
import math
import re
import signal
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Tags: the one table of what a run can be tagged with. README tables are rendered from it.


@dataclass(frozen=True)
class Tag:
    template: str  # fields in braces: {metric} is accuracy or f1, {split} is train, val or test
    error: bool  # an error tag ends the run as Failed, with exit status 1
    meaning: str
    resumable: bool = False  # --resume yes can continue such a run from its last checkpoint

    def __call__(self, **fields) -> str:
        return self.template.format(**fields)

    @property
    def pattern(self) -> str:
        return self.template.replace("{metric}", "METRIC").replace("{split}", "SPLIT")

    def matches(self, tag: str) -> bool:
        """Whether `tag` is this tag, its fields filled in any way."""
        return template_pattern(self.template).fullmatch(tag) is not None


@functools.cache  # a report matches every run's tags against a few templates
def template_pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\{\w+\\}", ".+", re.escape(template)))


SUCCESS = Tag("Success", False, "training completed every epoch")
EARLY_STOPPED = Tag(
    "Early stopped",
    False,
    "--monitor did not improve for --patience epochs: training stopped there (Finished, exit 0); the best "
    "epoch is in results.json and W&B's summary (best/...), its weights in best.pt",
)
OVERFITTING_LEARNING = Tag(
    "Overfitting {metric} (learning)", False, "train minus test METRIC above --overfitting_threshold at some epoch"
)
OVERFITTING_END = Tag(
    "Overfitting {metric} (end)", False, "train minus test METRIC still above --overfitting_threshold at the last epoch"
)
RANDOM_GUESSING = Tag(
    "Random guessing {metric} ({split})",
    False,
    "at the end, METRIC on SPLIT within --rnd_threshold of guessing uniformly at random",
)
MOST_PROBABLE_GUESSING = Tag(
    "Most probable guessing {metric} ({split})",
    False,
    "at the end, METRIC on SPLIT within --mp_threshold of always guessing the training set's most frequent class",
)
VANISHING_GRADIENT = Tag("Vanishing gradient", False, "total gradient norm below --vanishing_threshold for some batch")
EXPLODING_GRADIENT = Tag("Exploding gradient", False, "total gradient norm above --exploding_threshold for some batch")
HIGH_STD = Tag("High StdDev", False, "standard deviation of the gradient norm within an epoch above --std_threshold")
IRRELEVANT = Tag(
    "Irrelevant hyperparameters",
    True,
    "a redundant combination (see prune_hyperparameters); not trained with --abort_irrelevant yes",
)
USER_ABORT = Tag(
    "User abort", True, "stopped by SIGINT (Ctrl+C) at the next batch; history so far kept", resumable=True
)
HANGUP = Tag(
    "Hangup",
    True,
    "stopped by SIGHUP (the terminal it ran in closed: a dropped ssh session, a shut window) at the next batch; "
    "history so far kept; under nohup, tmux or screen a closed terminal stops nothing",
    resumable=True,
)
TIMEOUT = Tag(
    "Timeout",
    True,
    "an epoch took longer than --epoch_timeout (a stuck training process is killed); history so far kept",
    resumable=True,
)
NAN_LOSS = Tag("NaN loss", True, "the loss was NaN; training stopped, no step taken with it")
INF_LOSS = Tag("Inf loss", True, "the loss was infinite; training stopped, no step taken with it")
NAN_GRADIENT = Tag(
    "NaN gradient",
    True,
    "the total gradient norm was NaN or infinite with a finite loss; training stopped, no step taken with it",
)
PREEMPTED = Tag(
    "Preempted",
    True,
    "stopped by SIGTERM to every process of the job (a scheduler's preemption, as SLURM sends it), or by "
    "SIGUSR1 or SIGUSR2 (a scheduler's warning of the job's end: SLURM's --signal=USR1@90), at the "
    "next batch; marked preempting in W&B, which re-queues a sweep run; "
    "the epoch under way is dropped, to be trained again by --resume yes from the last checkpoint",
    resumable=True,
)
STOPPED = Tag(
    "Stopped",
    True,
    "stopped by SIGTERM to main.py alone (wandb agent's stop command or early termination, `kill PID`) at "
    "the next batch, or by main.py's death (the agent's SIGKILL after it); not re-queued by W&B; the epoch "
    "under way is dropped, as for Preempted",
    resumable=True,
)
SAVE_FAILED = Tag(
    "Save failed",
    True,
    "a checkpoint, model.pt or results.json could not be written (a full disk, a quota): the run stops, "
    "keeping the last good checkpoint and the history saved so far; free space, then --resume yes",
    resumable=True,
)
EXCEPTION = Tag(
    "Exception",
    True,
    "the training code raised an exception (a bug): its traceback is printed, and in W&B's Logs tab; "
    "not resumable, it would only raise again",
)
WANDB_LOST = Tag(
    "W&B lost",
    True,
    "W&B's service died under a W&B call of the training code's own (a wandb.log in the loop): the run stopped "
    "there, keeping every epoch it finished; --resume yes goes on from the last checkpoint, with W&B anew",
    resumable=True,
)
CRASHED = Tag(
    "Crashed",
    True,
    "the training process was killed (segmentation fault, abort, out-of-memory kill); every epoch it finished is kept",
    resumable=True,
)

TAGS = (
    SUCCESS,
    EARLY_STOPPED,
    OVERFITTING_LEARNING,
    OVERFITTING_END,
    RANDOM_GUESSING,
    MOST_PROBABLE_GUESSING,
    VANISHING_GRADIENT,
    EXPLODING_GRADIENT,
    HIGH_STD,
    IRRELEVANT,
    USER_ABORT,
    HANGUP,
    TIMEOUT,
    NAN_LOSS,
    INF_LOSS,
    NAN_GRADIENT,
    PREEMPTED,
    STOPPED,
    SAVE_FAILED,
    EXCEPTION,
    WANDB_LOST,
    CRASHED,
)
ERROR_TAGS = frozenset(tag.template for tag in TAGS if tag.error)
# What the training process makes of a stop signal: SIGINT is Ctrl+C; SIGHUP a closed terminal (unless the
# process started ignoring it, under nohup); SIGTERM a scheduler's preemption (it reaches every process of
# the job, the training process too), and so are SIGUSR1 and SIGUSR2, which schedulers send ahead of a job's
# end (SLURM's --signal=USR1@90, as Lightning's auto-requeue asks; Grid Engine's -notify). The guard's own
# words (watch.py) are real-time signals, which nobody else sends: GUARD_STOP for a SIGTERM that reached
# main.py alone, GUARD_DIED what Linux sends when the guard dies. Without real-time signals (not Linux) they
# are SIGUSR1 and SIGUSR2, which then mean those words.
_REALTIME = getattr(signal, "SIGRTMIN", None)
GUARD_STOP, GUARD_DIED = (_REALTIME + 1, _REALTIME + 2) if _REALTIME else (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = {
    signal.SIGINT: USER_ABORT,
    signal.SIGHUP: HANGUP,
    signal.SIGTERM: PREEMPTED,
    signal.SIGUSR1: PREEMPTED,
    signal.SIGUSR2: PREEMPTED,
    GUARD_STOP: STOPPED,
    GUARD_DIED: STOPPED,
}

# Ends that --resume yes can continue from the last checkpoint; after the others it would only repeat them.
RESUMABLE_TAGS = frozenset(tag.template for tag in TAGS if tag.resumable)


def failed(tags: list[str]) -> bool:
    return any(tag in ERROR_TAGS for tag in tags)


def resumable(tags: list[str]) -> bool:
    return any(tag in RESUMABLE_TAGS for tag in tags)


def add_tags(tags: list[str], new: list[str]) -> None:
    """Append in order of first occurrence: a tag raised every epoch is listed once."""
    tags.extend(t for t in dict.fromkeys(new) if t not in tags)


# ----------------------------------------------------------------------------------------------
# Detectors: pure functions over plain numbers. main.py reads the device once per epoch and
# feeds them; tests feed them directly.

SPLITS = ("train", "val", "test")
WANDB_TAG_LIMIT = 64  # characters; W&B drops a longer tag without a word


# ----------------------------------------------------------------------------------------------
# Metrics: the one table of what is measured on each split. main.py computes each with the torcheval
# function named here; the guessing detectors compare it with its baselines, where it has them; the
# README tables and W&B's summary are derived from it. Add a row to add a metric.


def random_accuracy(counts: list[int]) -> float:
    """Guessing uniformly among the K classes is right once in K."""
    return 1 / len(counts)


def random_f1(counts: list[int]) -> float:
    """Expected macro F1 of guessing uniformly, given the split's label counts: class c has precision
    p_c (its share) and recall 1/K."""
    k, n = len(counts), sum(counts)
    return sum(2 * (c / n) / k / (c / n + 1 / k) for c in counts) / k


def most_probable_share(train_counts: list[int], counts: list[int]) -> tuple[float, int]:
    """The share of a split that is the training set's most frequent class (the guess), and how many
    classes count in a macro average: as in torcheval, those absent from both labels and predictions
    do not."""
    guess = max(range(len(train_counts)), key=train_counts.__getitem__)
    share = counts[guess] / sum(counts)
    return share, sum(1 for c, n in enumerate(counts) if n > 0 or c == guess)


def most_probable_accuracy(train_counts: list[int], counts: list[int]) -> float:
    return most_probable_share(train_counts, counts)[0]


def most_probable_f1(train_counts: list[int], counts: list[int]) -> float:
    share, present = most_probable_share(train_counts, counts)
    return 2 * share / (1 + share) / present


@dataclass(frozen=True)
class Metric:
    name: str
    torcheval: str  # the function of torcheval.metrics.functional that computes it from predictions and labels
    options: tuple  # its keyword arguments beyond num_classes, as (name, value) pairs
    meaning: str
    random: object = None  # counts -> the expected score of guessing uniformly; None: no baseline
    most_probable: object = None  # (train counts, counts) -> the score of always guessing the most frequent class
    higher_is_better: bool = True  # which way --monitor judges it


METRICS = (
    Metric(
        "accuracy",
        "multiclass_accuracy",
        (),
        "share of samples classified right",
        random_accuracy,
        most_probable_accuracy,
    ),
    Metric(
        "f1",
        "multiclass_f1_score",
        (("average", "macro"),),
        "F1 score averaged over the classes present (macro)",
        random_f1,
        most_probable_f1,
    ),
)
METRIC_NAMES = tuple(m.name for m in METRICS)
BASELINES = ("random", "most_probable")


def baselines(counts: dict[str, list[int]]) -> dict[str, float]:
    """What guessing scores on each split, from its label counts: keys like val/random_accuracy. A metric
    without a baseline of a kind has no key: the detector of that kind skips it."""
    row = {}
    for split, c in counts.items():
        for metric in METRICS:
            if metric.random:
                row[f"{split}/random_{metric.name}"] = metric.random(c)
            if metric.most_probable:
                row[f"{split}/most_probable_{metric.name}"] = metric.most_probable(counts["train"], c)
    return row


def check_tag_lengths(tags: tuple[Tag, ...]) -> None:
    """Refuse, as the table is built, a tag W&B would drop: every metric and split filled in."""
    too_long = {
        text
        for tag in tags
        for metric in METRICS
        for split in SPLITS
        if len(text := tag(metric=metric.name, split=split)) > WANDB_TAG_LIMIT
    }
    if too_long:
        raise ValueError(f"tags longer than W&B's {WANDB_TAG_LIMIT} characters: {', '.join(sorted(too_long))}")


check_tag_lengths(TAGS)


def gradient_tags(norm_min: float, norm_max: float, norm_std: float, opts: dict) -> list[str]:
    tags = []
    if norm_min < opts["vanishing_threshold"]:
        tags.append(VANISHING_GRADIENT())
    if norm_max > opts["exploding_threshold"]:
        tags.append(EXPLODING_GRADIENT())
    if norm_std > opts["std_threshold"]:
        tags.append(HIGH_STD())
    return tags


def nonfinite_step(losses: list[float], norms: list[float | None]) -> tuple[int, str] | None:
    """The first batch whose loss or gradient norm is not finite, and the error tag it earns. A batch's norm is
    None where it took no optimizer step of its own (--accumulate: only a step's last batch has one)."""
    for i, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        if math.isnan(loss):
            return i, NAN_LOSS()
        if math.isinf(loss):
            return i, INF_LOSS()
        if norm is not None and not math.isfinite(norm):
            return i, NAN_GRADIENT()
    return None


def describe(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, population standard deviation, min and max, leaving NaN out (it has its own tag)."""
    values = [v for v in values if not math.isnan(v)] or [math.nan]
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), min(values), max(values)


def monitors() -> dict[str, bool]:
    """What --monitor may judge a run by: the validation loss and each metric of the table on the validation
    split, each with whether higher is better."""
    return {"val/loss": False, **{f"val/{m.name}": m.higher_is_better for m in METRICS}}


NO_MONITOR = "none"  # --monitor none: no best epoch kept, and --patience cannot act


def best_epoch(history: list[dict], monitor: str) -> dict | None:
    """The evaluated epoch's row with the best `monitor` value (the first of equals); None before any."""
    rows = [row for row in history if row.get("evaluated") and math.isfinite(row.get(monitor, math.nan))]
    if monitor == NO_MONITOR or not rows:
        return None
    return (max if monitors()[monitor] else min)(rows, key=lambda row: row[monitor])


def best_summary(row: dict) -> dict:
    """The best epoch as W&B's summary and results.json keep it: its number, its validation metrics and the
    test metrics at that epoch (the test score a paper reports: chosen on validation, never a maximum)."""
    return {"best/epoch": row["epoch"]} | {
        f"best/{key}": value
        for key, value in row.items()
        if key.startswith(("val/", "test/")) and not key.endswith("/time")
    }


def patience_over(history: list[dict], monitor: str, patience: int) -> bool:
    """Whether `monitor` has not improved for `patience` evaluated epochs (0: never)."""
    best = best_epoch(history, monitor)
    evaluated = [row["epoch"] for row in history if row.get("evaluated")]
    return bool(patience and best and evaluated[-1] - best["epoch"] >= patience)


def overfitting_tags(row: dict, threshold: float, tag: Tag) -> list[str]:
    return [tag(metric=m) for m in METRIC_NAMES if row.get(f"gap/{m}", -math.inf) > threshold]


def guessing_tags(row: dict, baseline: str, threshold: float, tag: Tag) -> list[str]:
    """`baseline` names the row's baseline keys, e.g. val/random_accuracy for val/accuracy; a metric
    without that baseline is skipped."""
    return [
        tag(metric=m, split=s)
        for s in SPLITS
        for m in METRIC_NAMES
        if f"{s}/{m}" in row
        and f"{s}/{baseline}_{m}" in row
        and row[f"{s}/{m}"] <= row[f"{s}/{baseline}_{m}"] + threshold
    ]


# ----------------------------------------------------------------------------------------------
# Pruning: combinations that would only repeat another run. Add a rule as one more `if`.


def prune_hyperparameters(opts: dict, parser: argparse.ArgumentParser) -> list[str]:
    """Why this combination is redundant; empty when it is not."""
    default = parser.get_default
    reasons = []
    if opts["optimizer"] == "adam" and opts["momentum"] != default("momentum"):
        reasons.append(f"--momentum only acts with --optimizer sgd, so this run repeats momentum {default('momentum')}")
    if opts["monitor"] == NO_MONITOR and opts["patience"] != default("patience"):
        reasons.append(f"--patience only acts with a --monitor, so this run repeats patience {default('patience')}")
    return reasons


# ----------------------------------------------------------------------------------------------
# Group names: a readable word pair plus a hash of the hyper-parameters, the same on any machine.


def _words(name: str) -> list[str]:
    return (HERE / name).read_text().split()


def generate_name(opts: dict, hyperparameters: list[str]) -> str:
    """The group of a run: the same for any run with these hyper-parameters' values, seeds aside."""
    hyper = {name: opts[name] for name in hyperparameters}
    canonical = json.dumps(hyper, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    adjectives, nouns = _words("adjectives.txt"), _words("nouns.txt")
    adjective = adjectives[int(digest[8:16], 16) % len(adjectives)]
    noun = nouns[int(digest[16:24], 16) % len(nouns)]
    return f"{adjective}-{noun}-{digest[:8]}"
