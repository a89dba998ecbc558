"""Everything main.py needs that is not the experiment itself.

Argument validators and the parser, the tag table, the event detectors (pure functions over
plain numbers, so they are tested without training), hyper-parameter pruning, group names,
seeding and atomic file writes. Nothing here imports torch or wandb: `python main.py --help`
answers before either is loaded.
"""

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

HERE = Path(__file__).resolve().parent


class StartError(Exception):
    """The run cannot start (no data, no place to save, no W&B); the message says what to do."""


def described(e: BaseException) -> str:
    """An exception as a user reads it in one line: its type and its own message, whole (up to 300 characters)."""
    return f"{type(e).__name__}: {' '.join(line.strip() for line in str(e).splitlines())[:300] or 'no message'}"


class UsageError(StartError):
    """A command-line value that only the data rules out: exit status 2, as for any usage error."""


class RunEnded(Exception):
    """The run has ended early and its end is written (results.json could not be saved): raised
    through the training loop to stop it."""


# ----------------------------------------------------------------------------------------------
# Validators: argparse `type=` callables. Their limits are public attributes so that tools (the
# README generator) can describe a flag without parsing error messages.


class Validator:
    """Base of the validators: `kind` is the Python type a flag's value has once parsed, and
    describe() says what a value may be, beginning with the type's name."""

    kind: type = str

    @property
    def __name__(self) -> str:  # argparse names the type in some of its messages
        return self.kind.__name__

    def describe(self) -> str:
        return self.kind.__name__

    def __call__(self, text: str):
        return text


@dataclass(frozen=True)
class Number(Validator):
    """An int or a float, optionally bounded."""

    kind: type = float
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def describe(self) -> str:
        show = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        bounds = [f"{'>' if self.min_open else '>='} {show(self.min)}"] if self.min is not None else []
        bounds += [f"{'<' if self.max_open else '<='} {show(self.max)}"] if self.max is not None else []
        return " and ".join([self.kind.__name__ + (" " + bounds[0] if bounds else "")] + bounds[1:])

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        too_low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if not math.isfinite(value) or too_low or too_high:  # no flag has a use for inf: 0 is "off"
            finite = "a finite " if self.kind is float else ""
            raise argparse.ArgumentTypeError(f"expected {finite}{self.describe()}, got {text!r}")
        return value


INT64 = 2**63  # torch takes seeds, and Python's range() lengths, below it


RANDOM_SEED = "random"


@dataclass(frozen=True)
class Seed(Number):
    """An int >= 0, or `random` for one drawn from the clock (resolve_seed draws it)."""

    kind: type = int
    min: float | None = 0
    max: float | None = INT64
    max_open: bool = True

    def describe(self) -> str:
        return f"{super().describe()}, or {RANDOM_SEED}"

    def __call__(self, text: str) -> int | str:
        return RANDOM_SEED if text.lower() == RANDOM_SEED else super().__call__(text)


@dataclass(frozen=True)
class Boolean(Validator):
    """yes/no, true/false or 1/0 in any letter case (the W&B agent passes True/False)."""

    kind: type = bool

    def describe(self) -> str:
        return "bool (yes/no)"

    def __call__(self, text: str) -> bool:
        if text.lower() in ("yes", "true", "1"):
            return True
        if text.lower() in ("no", "false", "0"):
            return False
        raise argparse.ArgumentTypeError(f"expected one of yes/no/true/false/1/0, got {text!r}")


@dataclass(frozen=True)
class Widths(Validator):
    """Comma-separated layer widths, e.g. 512,512; empty for no hidden layer."""

    kind: type = tuple

    def describe(self) -> str:
        return "ints >= 1, comma-separated"

    def __call__(self, text: str) -> tuple[int, ...]:
        try:
            widths = tuple(int(w) for w in text.split(",")) if text.strip() else ()
        except ValueError:
            widths = (0,)
        if any(w < 1 for w in widths):
            raise argparse.ArgumentTypeError(f"expected {self.describe()} like 512,512, got {text!r}")
        return widths


# ----------------------------------------------------------------------------------------------
# The parser: the one place to add a hyper-parameter. Options in the HYPERPARAMETERS group change
# results and make up the group name; every other group is housekeeping.

HYPERPARAMETERS = "hyper-parameters"
PRECISIONS = ("fp32", "bf16")
THRESHOLDS = "detector thresholds"


class OptionGroup(NamedTuple):
    description: str | None
    actions: list[argparse.Action]
    group: Any = None  # argparse's group, whose add_argument adds one more (None for argparse's default groups)


class Parser(argparse.ArgumentParser):
    """argparse's parser, keeping each group's options as they are added, in `groups` by title: argparse
    keeps them in private lists and has no public way to read them back. A group's add_argument, the
    parser's own and add_argument_group are argparse's, unchanged but for the note they take."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.groups: dict[str, OptionGroup] = {}  # before argparse's own init, which adds two groups
        super().__init__(*args, **kwargs)

    def add_argument_group(self, title: str | None = None, description: str | None = None, **kwargs: Any) -> Any:
        group = super().add_argument_group(title, description, **kwargs)
        options = self.groups.setdefault(title, OptionGroup(description, [], group))
        add = group.add_argument

        def add_argument(*args: Any, **kwargs: Any) -> argparse.Action:
            action = add(*args, **kwargs)
            options.actions.append(action)
            return action

        group.add_argument = add_argument
        return group

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)  # into argparse's default groups (--help too)
        if action.dest != "help":
            title = "options" if action.option_strings else "positional arguments"
            self.groups.setdefault(title, OptionGroup(None, [])).actions.append(action)
        return action


def get_arg_parser() -> Parser:
    parser = Parser(
        description="Train an MLP on MNIST with a hand-written loop; log, group and tag the run in W&B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a misspelt sweep key must fail, not set another flag (--hid is not --hidden)
    )
    yes_no, text = Boolean(), Validator()

    hyper = parser.add_argument_group(HYPERPARAMETERS, "they change results, so they name the W&B group")
    hyper.add_argument(
        "--epochs", type=Number(int, min=1, max=INT64, max_open=True), default=10, help="passes over the training split"
    )
    hyper.add_argument("--batch_size", type=Number(int, min=1), default=128, help="samples per optimizer step")
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
    hyper.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="forward and loss in fp32, or in bf16 under autocast (parameters, optimizer state "
        "and gradient norm stay fp32)",
    )
    hyper.add_argument(
        "--val_size",
        type=Number(int, min=1),
        default=5000,
        help="samples held out of the official training set for validation",
    )

    exp = parser.add_argument_group("experiment")
    exp.add_argument(
        "--seed",
        type=Seed(),
        default=0,
        help=f"random seed; {RANDOM_SEED}: drawn from the clock, and recorded like any other",
    )
    exp.add_argument(
        "--device",
        type=text,
        default=None,
        help="cpu, cuda, cuda:N, ...; unset: $DEVICE, else cuda if available, else cpu",
    )
    exp.add_argument("--data_path", type=text, default="data", help="folder holding MNIST/raw/")
    exp.add_argument(
        "--workers",
        type=Number(int, min=0),
        default=0,
        help="DataLoader worker processes; 0: data that fits lives on the device, batches are slices",
    )
    exp.add_argument(
        "--epoch_timeout",
        type=Number(float, min=0),
        default=0.0,
        help="minutes an epoch may take before the run stops with Timeout, 0 = off",
    )
    exp.add_argument(
        "--abort_irrelevant",
        type=yes_no,
        default="yes",
        metavar="{yes,no}",
        help="do not train a redundant hyper-parameter combination",
    )
    exp.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="0 quiet, 1 epoch progress and summaries, 2 batch progress too",
    )
    exp.add_argument(
        "--resume",
        type=yes_no,
        default="no",
        metavar="{yes,no}",
        help="continue this command's newest stopped run (same group and seed; with --seed random, "
        "any seed) from its checkpoint; one that ended already is reported, not trained again",
    )
    exp.add_argument(
        "--checkpoint_every",
        type=Number(int, min=0),
        default=1,
        help="epochs between checkpoints (what --resume continues from), 0 = none",
    )
    exp.add_argument(
        "--watchdog",
        type=yes_no,
        default="yes",
        metavar="{yes,no}",
        help="train under a guard process, so that a crash or a hang still ends the run properly; "
        "no: without it (for a debugger or a profiler)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--wandb_project", type=text, default=None, help="W&B project; unset = no W&B")
    out.add_argument(
        "--save",
        type=yes_no,
        default="no",
        metavar="{yes,no}",
        help="save model.pt, config.json and results.json under --output_path",
    )
    out.add_argument("--output_path", type=text, default="outputs", help="folder for saved runs")

    thr = parser.add_argument_group(THRESHOLDS, "when the detectors tag a run (see the tags table)")
    thr.add_argument(
        "--overfitting_threshold",
        type=Number(float, min=0),
        default=0.5,
        help="train minus test metric above this is overfitting",
    )
    thr.add_argument(
        "--vanishing_threshold",
        type=Number(float, min=0),
        default=1e-5,
        help="a total gradient norm below this is vanishing",
    )
    thr.add_argument(
        "--exploding_threshold",
        type=Number(float, min=0),
        default=1e7,
        help="a total gradient norm above this is exploding",
    )
    thr.add_argument(
        "--std_threshold",
        type=Number(float, min=0),
        default=200.0,
        help="a std of the gradient norm within an epoch above this is high",
    )
    thr.add_argument(
        "--rnd_threshold",
        type=Number(float, min=0),
        default=0.1,
        help="a metric within this of random guessing is random guessing",
    )
    thr.add_argument(
        "--mp_threshold",
        type=Number(float, min=0),
        default=0.1,
        help="a metric within this of always guessing the most frequent class",
    )
    return parser


def option_groups(parser: "Parser") -> dict[str, "OptionGroup"]:
    """The parser's options by group title, in order (--help left out)."""
    return parser.groups


def hyperparameter_names(parser: Parser | None = None) -> list[str]:
    return [a.dest for a in option_groups(parser or get_arg_parser())[HYPERPARAMETERS].actions]


# ----------------------------------------------------------------------------------------------
# Pruning: combinations that would only repeat another run. Add a rule as one more `if`.


def prune_hyperparameters(opts: dict, parser: Parser | None = None) -> list[str]:
    """Why this combination is redundant; empty when it is not."""
    default = (parser or get_arg_parser()).get_default
    reasons = []
    if opts["optimizer"] == "adam" and opts["momentum"] != default("momentum"):
        reasons.append(f"--momentum only acts with --optimizer sgd, so this run repeats momentum {default('momentum')}")
    return reasons


# ----------------------------------------------------------------------------------------------
# Group names: a readable word pair plus a hash of the hyper-parameters, the same on any machine.


def _words(name: str) -> list[str]:
    return (HERE / name).read_text().split()


def generate_name(opts: dict) -> str:
    hyper = {name: opts[name] for name in hyperparameter_names()}
    canonical = json.dumps(hyper, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    adjectives, nouns = _words("adjectives.txt"), _words("nouns.txt")
    adjective = adjectives[int(digest[8:16], 16) % len(adjectives)]
    noun = nouns[int(digest[16:24], 16) % len(nouns)]
    return f"{adjective}-{noun}-{digest[:8]}"


def resolve_seed(seed: int | str) -> int:
    """The seed to use and record: RANDOM_SEED draws one from the clock."""
    return time.time_ns() % 2**31 if seed == RANDOM_SEED else seed


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


SUCCESS = Tag("Success", False, "training completed every epoch")
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
    "stopped by SIGTERM to every process of the job (a scheduler's preemption, as SLURM sends it) at the "
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
    OVERFITTING_LEARNING,
    OVERFITTING_END,
    RANDOM_GUESSING,
    MOST_PROBABLE_GUESSING,
    VANISHING_GRADIENT,
    EXPLODING_GRADIENT,
    HIGH_STD,
    IRRELEVANT,
    USER_ABORT,
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
# What the training process makes of a stop signal: SIGINT is Ctrl+C; SIGTERM a scheduler's preemption
# (it reaches every process of the job, the training process too); SIGUSR1 is the guard's word for a
# SIGTERM that reached main.py alone, and SIGUSR2 what Linux sends when the guard dies (see watch.py).
STOP_SIGNALS = {signal.SIGINT: USER_ABORT, signal.SIGTERM: PREEMPTED, signal.SIGUSR1: STOPPED, signal.SIGUSR2: STOPPED}

# Ends that --resume yes can continue from the last checkpoint; after the others it would only repeat them.
RESUMABLE_TAGS = frozenset(tag.template for tag in TAGS if tag.resumable)


def failed(tags: list[str]) -> bool:
    return any(tag in ERROR_TAGS for tag in tags)


def resumable(tags: list[str]) -> bool:
    return any(tag in RESUMABLE_TAGS for tag in tags)


def add_tags(tags: list[str], new: list[str]) -> None:
    """Append in order of first occurrence: a tag raised every epoch is listed once."""
    tags.extend(t for t in dict.fromkeys(new) if t not in tags)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def tags_table() -> str:
    return markdown_table(
        ["tag", "kind", "meaning"],
        [
            [f"`{t.pattern}`", ("error" if t.error else "info") + (", resumable" if t.resumable else ""), t.meaning]
            for t in TAGS
        ],
    )


def thresholds_table(parser: Parser | None = None) -> str:
    actions = option_groups(parser or get_arg_parser())[THRESHOLDS].actions
    return markdown_table(
        ["flag", "default", "meaning"], [[f"`{a.option_strings[0]}`", f"{a.default:g}", a.help] for a in actions]
    )


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


def metrics_table() -> str:
    return markdown_table(
        ["metric", "computed by (torcheval)", "guessing baselines", "meaning"],
        [
            [
                f"`{m.name}`",
                f"`{m.torcheval}`" + "".join(f", {k}={v}" for k, v in m.options),
                ", ".join(kind for kind in BASELINES if getattr(m, kind)) or "none",
                m.meaning,
            ]
            for m in METRICS
        ],
    )


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


def nonfinite_step(losses: list[float], norms: list[float]) -> tuple[int, str] | None:
    """The first batch whose loss or gradient norm is not finite, and the error tag it earns."""
    for i, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        if math.isnan(loss):
            return i, NAN_LOSS()
        if math.isinf(loss):
            return i, INF_LOSS()
        if not math.isfinite(norm):
            return i, NAN_GRADIENT()
    return None


def describe(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, population standard deviation, min and max, leaving NaN out (it has its own tag)."""
    values = [v for v in values if not math.isnan(v)] or [math.nan]
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), min(values), max(values)


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
# Files: written whole or not at all, so a run killed while saving never leaves half a file.


PARTIAL = ".partial"  # the end of the name of a file atomic_write has not finished


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`. A kill in between
    leaves the temporary file: remove_partial_writes() clears them."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_partial_writes(folder: Path, name: str = "*") -> None:
    """What atomic_write left in `folder` (of the file `name`, or any) when its process was killed
    mid-write. Call it only while no other process can be writing them (the folder or file is owned)."""
    for leftover in folder.glob(f".{name}.*{PARTIAL}"):
        leftover.unlink(missing_ok=True)


def write_failure(path: Path, save: Callable[[], None]) -> str | None:
    """Call save(), which writes `path`: None when it could, else why not (a full disk, a quota, a
    read-only folder), for a run to end with that reason rather than a traceback."""
    try:
        save()
        return None
    except Exception as e:
        cause = e  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        return f"could not write {path} ({cause.strerror or cause})"


def json_safe(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity: write them as the strings "NaN", "Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(json_safe(obj), indent=2, allow_nan=False).encode() + b"\n"
    atomic_write(path, lambda f: f.write(data))


PR_SET_PDEATHSIG = 1  # prctl(2)


def stop_with_parent(parent: int, signum: int) -> None:
    """In a child process before it starts its program: Linux sends it `signum` when `parent` dies, even by
    SIGKILL, so that it stops cleanly instead of going on unwatched."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call, the child outlives its parent
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signum)


# The CPU flags of native bf16 arithmetic (Linux's names), and the oneDNN instruction sets below it.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def slow_bf16_cpu(cpu_flags: str, onednn_max_isa: str = "") -> str | None:
    """Why bf16 would run emulated, and slowly, on this CPU: no native bf16 instruction among its flags
    (/proc/cpuinfo's), or oneDNN told not to use them (ONEDNN_MAX_CPU_ISA)."""
    if onednn_max_isa.upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return f"ONEDNN_MAX_CPU_ISA={onednn_max_isa} keeps oneDNN from this CPU's bf16 instructions"
    if not any(flag in cpu_flags.split() for flag in BF16_CPU_FLAGS):
        return f"this CPU has no native bf16 instructions ({' or '.join(BF16_CPU_FLAGS)})"
    return None
