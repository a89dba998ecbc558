"""Runs read back for a report (report.py, local_sweep.py): from run folders (--save yes: results.json and
config.json) or from W&B's server (wandb.Api), as plain records; grouped, with the statistics over each
group's replicates. Torch-free: 10,000 run folders take seconds, not torch's import.
"""

import collections
import functools
import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import utils

BEST, LAST = "best", "last"  # which epoch of a run a metric is read at
# The tags a report counts per group, besides the finished and failed runs: what a reader must know
# before trusting a mean (the error tags leave a run out of the statistics: it is counted as failed).
COUNTED_TAGS = {
    "overfitting": (utils.OVERFITTING_LEARNING, utils.OVERFITTING_END),
    "guessing": (utils.RANDOM_GUESSING, utils.MOST_PROBABLE_GUESSING),
}


class ReportError(Exception):
    """The runs cannot be read (no runs, W&B unreachable): the message says which and why."""


@dataclass
class Replicate:
    """One run, as a report needs it, wherever it was read from."""

    name: str
    group: str
    config: dict
    status: str  # finished, failed, crashed (W&B), running (W&B)
    tags: list[str]
    best: dict  # best/... as results.json and W&B's summary keep it; empty without a best epoch
    last: dict  # the metrics of the last evaluated epoch
    history: Callable[[list[str]], list[dict]] = field(repr=False)  # (keys) -> the evaluated epochs' rows
    code: str | None = None  # code/version: the code that trained it (boilerplate/provenance.py); None: not recorded

    @property
    def counted(self) -> bool:
        """Whether the run is one of its group's replicates: it finished, with no error tag."""
        return self.status == "finished" and not utils.failed(self.tags)

    def value(self, key: str, at: str) -> float | None:
        """`key` (val/accuracy, test/loss, ...) at the best epoch (the last where the run kept no best, or
        where the best epoch does not record the key: best/ holds the validation and test metrics), or at
        the last epoch."""
        found = self.best.get(f"best/{key}") if at == BEST else None
        found = self.last.get(key) if found is None else found
        return float(found) if isinstance(found, (int, float)) else None


# ----------------------------------------------------------------------------------------------
# Reading runs


def read_folders(root: Path) -> tuple[list[Replicate], list[str]]:
    """Every run folder under `root` (at any depth: a sweep's runs sit a level deeper), and what could not
    be read (each "path (why)"), skipped."""
    runs, damaged = [], []
    for path in sorted(root.rglob("results.json")):
        try:
            results = json.loads(path.read_text())
            config_path = path.with_name("config.json")
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
            history = [row for row in results["history"] if row.get("evaluated")]
            runs.append(
                Replicate(
                    name=path.parent.name,
                    group=results["group"],
                    config=config,
                    status=results["status"],
                    tags=list(results["tags"]),
                    best=results.get("best") or {},
                    last=history[-1] if history else {},
                    history=lambda keys, rows=history: [row for row in rows if all(k in row for k in keys)],
                    code=(results.get("constants") or {}).get("code/version"),
                )
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            damaged.append(f"{path} ({type(e).__name__}: {e})")
    return runs, damaged


def read_wandb(path: str, sweep: str | None = None, timeout: int = 30) -> list[Replicate]:
    """The runs of an ENTITY/PROJECT on W&B's server (those of one sweep with `sweep`), through wandb.Api:
    their config, state, tags and summary now, their history only when asked (a curve)."""
    import wandb
    from wandb.errors import CommError, UsageError

    from . import wandb_start

    try:
        # wandb.Api would retry a server that is down for its whole timeout, then blame the credentials
        server = wandb_start.read_settings(wandb).base_url
        if why := wandb_start.unreachable(server):
            raise ReportError(f"W&B's server {server} is unreachable ({why}): the runs of {path} cannot be read")
        api = wandb.Api(timeout=timeout)
        found = list(api.runs(path, filters={"sweep": sweep} if sweep else {}))
        return [from_wandb(run) for run in found]
    except (CommError, UsageError, OSError, ValueError) as e:  # OSError: requests' errors among them
        raise ReportError(f"W&B's runs of {path} could not be read ({type(e).__name__}: {e})") from None


def from_wandb(run: "wandb.apis.public.Run") -> Replicate:  # noqa: F821 (imported where called)
    summary = {k: v for k, v in run.summary_metrics.items() if not k.startswith("_")}  # plain JSON
    # A monitored metric's summary holds its best and its last (define_metric): the last is the epoch's.
    summary = {k: v.get("last") if isinstance(v, dict) else v for k, v in summary.items()}
    best = {k: v for k, v in summary.items() if k.startswith("best/")}
    last = {k: v for k, v in summary.items() if not k.startswith("best/") and isinstance(v, (int, float))}

    def history(keys: list[str]) -> list[dict]:
        rows = run.history(keys=["epoch", *keys], samples=1_000_000, pandas=False)
        return [row for row in rows if all(k in row for k in keys)]

    config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    tags = list(run.tags)
    return Replicate(run.id, run.group or "", config, run.state, tags, best, last, history, config.get("code/version"))


# ----------------------------------------------------------------------------------------------
# Statistics over replicates


@dataclass
class Stats:
    n: int
    mean: float
    std: float  # the sample standard deviation (n - 1); NaN for one replicate
    low: float  # the 95% confidence interval of the mean (Student's t); NaN for one replicate
    high: float


def stats(values: list[float]) -> Stats:
    n = len(values)
    if not n:
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n == 1:
        return Stats(1, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(values)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half)


@functools.cache  # a report asks for a few degrees of freedom, thousands of times
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (0.5 < p < 1), by bisection on its distribution function: the standard library
    has no t distribution, and the report must not need scipy. Tested against scipy's."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:  # 0.5 + the density's integral from 0 to x, by Simpson's rule
        steps, h = 2000, x / 2000
        f = [scale * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, high * 2
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def higher_is_better(key: str) -> bool:
    """From the metrics table: a metric's direction; a loss is lower-better."""
    name = key.rsplit("/", 1)[-1]
    return {m.name: m.higher_is_better for m in utils.METRICS}.get(name, name != "loss")


# ----------------------------------------------------------------------------------------------
# Groups


@dataclass
class Group:
    name: str
    runs: list[Replicate]
    stats: dict[str, Stats]  # metric -> its statistics over the counted replicates

    @property
    def config(self) -> dict:
        return self.runs[0].config

    @property
    def seeds(self) -> list[list[Replicate]]:
        """The replicates: the counted runs, those of one seed together (a command run twice, a sweep that drew
        a configuration again: the same numbers, no new evidence); a run that recorded no seed stands alone."""
        return by_seed(run for run in self.runs if run.counted)

    @property
    def finished(self) -> int:
        """The replicates: the seeds that finished."""
        return len(self.seeds)

    @property
    def repeats(self) -> int:
        """The counted runs of a seed another counted run of the group has."""
        return sum(run.counted for run in self.runs) - self.finished

    @property
    def codes(self) -> dict[str, int]:
        """The versions of the code its replicates' runs were trained by, and how many runs each."""
        return dict(collections.Counter(run.code for run in self.runs if run.counted and run.code))

    @property
    def running(self) -> int:
        return sum(run.status == "running" for run in self.runs)

    @property
    def failed(self) -> int:
        return len(self.runs) - self.finished - self.repeats - self.running

    def tagged(self, kind: str) -> int:
        """How many of the group's runs carry a tag of this kind (COUNTED_TAGS)."""
        return sum(any(tag.matches(t) for tag in COUNTED_TAGS[kind] for t in run.tags) for run in self.runs)


def by_seed(runs: Iterable[Replicate]) -> list[list[Replicate]]:
    """`runs` by their config's seed, in order of first appearance; a run without one in a list of its own."""
    found: dict[object, list[Replicate]] = {}
    for i, run in enumerate(runs):
        seed = run.config.get("seed")
        found.setdefault(("seed", seed) if seed is not None else ("run", i), []).append(run)
    return list(found.values())


def metrics_found(runs: Iterable[Replicate]) -> list[str]:
    """The metrics a report can show: every number the runs' epochs hold (their times aside)."""
    keys = {key for run in runs for key, v in run.last.items() if isinstance(v, (int, float))}
    return sorted(k for k in keys if "/" in k and not k.endswith("/time"))


def default_metrics(runs: list[Replicate]) -> list[str]:
    """The monitored validation metric (the runs' own --monitor, the most common one) and the test metrics."""
    monitors = [run.config.get("monitor") for run in runs if run.config.get("monitor") in utils.monitors()]
    first = [statistics.mode(monitors)] if monitors else []
    return first + [f"test/{name}" for name in (*utils.METRIC_NAMES, "loss")]


def groups(runs: list[Replicate], metrics: list[str], at: str) -> list[Group]:
    """One Group per W&B group, ranked by the first metric's mean (best first; groups without a finished
    replicate last)."""
    members: dict[str, list[Replicate]] = {}
    for run in runs:
        members.setdefault(run.group, []).append(run)
    found = []
    for name, group_runs in members.items():
        group = Group(name, group_runs, {})
        for m in metrics:  # one value a seed: the mean of its runs'
            per_seed = [[v for run in runs if (v := run.value(m, at)) is not None] for runs in group.seeds]
            group.stats[m] = stats([statistics.fmean(values) for values in per_seed if values])
        found.append(group)
    first, sign = metrics[0], (-1 if higher_is_better(metrics[0]) else 1)
    return sorted(found, key=lambda g: (math.isnan(g.stats[first].mean), sign * g.stats[first].mean, g.name))


def code_warnings(found: Iterable[Group]) -> list[str]:
    """A line for each group whose replicates were trained by more than one version of the code: a group is
    named by the hyper-parameters, not the code, so a model or a loss changed in main.py keeps it."""
    lines = []
    for g in found:
        if len(g.codes) > 1:
            versions = ", ".join(f"{code} ({n} run{'s' if n > 1 else ''})" for code, n in g.codes.items())
            lines.append(
                f"Warning: group {g.name}: its replicates were trained by {len(g.codes)} versions of the code "
                f"(code/version {versions}): they may not be replicates of one experiment"
            )
    return lines


def varied(found: list[Group], names: list[str]) -> tuple[list[str], dict]:
    """The hyper-parameters that differ between the groups, and those equal everywhere with their value."""
    values = {name: {json.dumps(g.config.get(name)) for g in found} for name in names}
    return [n for n in names if len(values[n]) > 1], {n: found[0].config.get(n) for n in names if len(values[n]) == 1}
