"""The command line: argparse's parser, the validators of its values, and the options every run has.

An experiment names its own hyper-parameters (main.py's add_hyperparameters); parser() adds the
hyper-parameters the run itself needs (epochs, batch size, precision, validation size) and the
housekeeping groups (seed, device, output, the detectors' thresholds). Nothing here imports torch or
wandb: `python main.py --help` answers before either is loaded.
"""

import argparse
import ast
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import utils

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


@dataclass(frozen=True)
class ProjectName(Validator):
    """A W&B project's name, by W&B's own rule (wandb.Settings' validator; tests/test_utils.py holds them
    together), checked as the command line is read: W&B would refuse it only once the data had loaded and
    the model was built, and this process must not import W&B to ask it (`--help` answers at once)."""

    longest: int = 128
    refused: str = "/\\#?%:"

    def describe(self) -> str:
        return f"str, at most {self.longest} characters, none of {' '.join(self.refused)}"

    def __call__(self, text: str) -> str:
        if found := [c for c in self.refused if c in text]:
            entity = " (an entity goes in WANDB_ENTITY)" if "/" in found else ""
            raise argparse.ArgumentTypeError(f"W&B refuses {' '.join(found)} in a project's name{entity}, got {text!r}")
        if len(text) > self.longest:
            raise argparse.ArgumentTypeError(f"W&B takes at most {self.longest} characters, got {len(text)}")
        return text


class UserPath(Validator):
    """A file's or a folder's path, a leading ~ the home folder as a shell makes it: W&B's agent and a
    sweep file's values reach main.py through no shell, and `--output_path=~/runs` was a folder named ~
    in the current one (and a `rm -rf ~` away from losing the home folder, to tidy it up)."""

    def __call__(self, text: str) -> str:
        return os.path.expanduser(text)


# ----------------------------------------------------------------------------------------------
# The parser: options in the HYPERPARAMETERS group change results and make up the group name; every
# other group is housekeeping.

HYPERPARAMETERS = "hyper-parameters"
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("constant", "cosine", "linear", "step")  # what boilerplate/schedules.py makes of each
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


def parser(description: str, add_hyperparameters: Callable[[Any], None]) -> Parser:
    """The whole command line: the experiment's hyper-parameters (`add_hyperparameters(group)` adds them to
    the group), the run's own, and the housekeeping options."""
    parser = Parser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a misspelt sweep key must fail, not set another flag (--hid is not --hidden)
    )
    yes_no, text, path = Boolean(), Validator(), UserPath()

    hyper = parser.add_argument_group(HYPERPARAMETERS, "they change results, so they name the W&B group")
    # The run's own: the loop, the precision checks and the held-out split read them (a fork changes a
    # default with parser.set_defaults(epochs=20)).
    hyper.add_argument(
        "--epochs", type=Number(int, min=1, max=INT64, max_open=True), default=10, help="passes over the training split"
    )
    hyper.add_argument(
        "--batch_size",
        type=Number(int, min=1),
        default=128,
        help="samples per batch (per optimizer step without --accumulate); under torchrun, the whole job's batch, "
        "shared by its ranks",
    )
    hyper.add_argument(
        "--accumulate",
        type=Number(int, min=1),
        default=1,
        help="batches whose gradients add up to one optimizer step: an effective batch N times larger "
        "(the epoch's last, shorter group steps too)",
    )
    hyper.add_argument(
        "--lr_schedule",
        choices=SCHEDULES,
        default="constant",
        help="the learning rate over the run's optimizer steps, from --lr: constant, cosine decay to 0, linear "
        "decay to 0, or step (x0.1 at half and at three quarters of the run)",
    )
    hyper.add_argument(
        "--warmup",
        type=Number(float, min=0, max=1, max_open=True),
        default=0.0,
        help="share of the run's optimizer steps over which the learning rate rises linearly from 0 to the "
        "schedule's, before it",
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
        help="samples held out of the training split for validation, when the data has no validation split",
    )
    hyper.add_argument(
        "--monitor",
        "--judge_by",  # the spelling torchrun passes on: its parser refuses --monitor (--monitor-interval's prefix)
        choices=(*utils.monitors(), utils.NO_MONITOR),
        default="val/accuracy",
        help="the validation metric the run is judged by: its best epoch (best/... in results.json and W&B's "
        "summary, with the test metrics at that epoch; its weights in best.pt with --save yes) and --patience; "
        "none: no best epoch. Under torchrun, whose own parser takes --monitor for an abbreviation, --judge_by",
    )
    hyper.add_argument(
        "--patience",
        type=Number(int, min=0),
        default=0,
        help="epochs without a better --monitor before training stops (Early stopped), 0 = never",
    )
    hyper.add_argument(
        "--init_from",
        type=path,
        default=None,
        help="start from these saved weights (a best.pt, a model.pt, a model artifact's file, or a checkpoint): "
        "fine-tuning; unset: from the model's own initialisation",
    )
    add_hyperparameters(hyper)
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
    exp.add_argument("--data_path", type=path, default="data", help="folder holding MNIST/raw/")
    exp.add_argument(
        "--workers",
        type=Number(int, min=0),
        default=0,
        help="DataLoader worker processes; 0: data that fits lives on the device, batches are slices",
    )
    exp.add_argument(
        "--compile",
        type=yes_no,
        default="no",
        metavar="{yes,no}",
        help="torch.compile the model, in place (its weights keep their names) and for static shapes (a resumed "
        "run is exact); each batch size's first batches pay the compilation",
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
        help="0 quiet; 1 a line per epoch (and a progress bar, on a terminal); 2 the bars of the epochs and the "
        "batches, in a log file too",
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
    out.add_argument("--wandb_project", type=ProjectName(), default=None, help="W&B project; unset = no W&B")
    out.add_argument(
        "--save",
        type=yes_no,
        default="no",
        metavar="{yes,no}",
        help="save model.pt, config.json and results.json under --output_path",
    )
    out.add_argument("--output_path", type=path, default="outputs", help="folder for saved runs")
    out.add_argument(
        "--log_model",
        choices=("no", "best", "end"),
        default="no",
        help="log the model's weights to W&B as an artifact of type model (the run's config and the epoch in "
        "its metadata): at each better --monitor (aliases best, latest), or once at the run's end (latest)",
    )

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


def hyperparameter_names(parser: Parser) -> list[str]:
    return [a.dest for a in option_groups(parser)[HYPERPARAMETERS].actions]


def resolve_seed(seed: int | str) -> int:
    """The seed to use and record: RANDOM_SEED draws one from the clock."""
    return time.time_ns() % 2**31 if seed == RANDOM_SEED else seed


def parser_of(script: Path) -> Parser:
    """The parser of an experiment's script (main.py's get_parser), read from the part of the script that
    runs before `python main.py --help` answers (its `if __name__ == "__main__":` blocks left out): up to its
    first torch import, or the first import after get_parser. Tools (the README generator, the sweep checks)
    need neither torch, nor the packages a fork imports beside it (numpy, say), nor their 2 s."""
    tree = ast.parse(script.read_text(), filename=str(script))
    head: list[ast.stmt] = []
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        has_parser = any(isinstance(n, ast.FunctionDef) and n.name == "get_parser" for n in head)
        if any(name.split(".")[0] == "torch" for name in names) or (names and has_parser):
            break
        if not is_main_block(node):
            head.append(node)
    namespace = {"__name__": script.stem, "__file__": str(script), "__doc__": ast.get_docstring(tree)}
    exec(compile(ast.Module(head, type_ignores=[]), str(script), "exec"), namespace)
    return namespace["get_parser"]()


def is_main_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`, where a script's own run begins."""
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )
