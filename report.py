"""Averages and errors over replicates: one row per group of runs (the seeds of one configuration).

    python report.py outputs                                # the run folders --save yes wrote
    python report.py --wandb ENTITY/PROJECT [--sweep ID]    # the runs on W&B's server
    python report.py outputs --format latex                 # or markdown, csv
    python report.py outputs --metric val/loss --at last    # other metrics, at the last epoch
    python report.py outputs --plot curves.png              # each group's learning curve
    python report.py outputs --replicates 5                 # the commands that run the missing seeds

Each row: the hyper-parameters that differ between the groups (those equal everywhere are printed once,
above the table), the runs that finished and failed, how many were tagged overfitting or guessing, and
for each metric the mean, the standard deviation and the 95% confidence interval of the mean (Student's
t) over the finished replicates, one a seed (runs that repeat a seed count once, as their mean). A run
with an error tag is counted as failed and left out of the statistics. By default the metrics are the
monitored validation metric at each run's best epoch and the test metrics at that epoch (the last epoch
for a run that kept no best): the test score chosen on validation, never a maximum over epochs. Groups
are ranked by the first metric, best first.
Exit status: 0 reported, 1 no runs or they cannot be read (W&B unreachable), 2 bad command line or an
unknown metric.
"""

import argparse
import csv
import io
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

from boilerplate import options
from boilerplate.replicates import (
    BEST,
    COUNTED_TAGS,
    LAST,
    Group,
    ReportError,
    Stats,
    code_warnings,
    default_metrics,
    groups,
    higher_is_better,
    metrics_found,
    read_folders,
    read_wandb,
    varied,
)
from generate_readme_stub import markdown_table

HERE = Path(__file__).resolve().parent
FORMATS = ("table", "markdown", "csv", "latex")


def plot_file(value: str) -> Path:
    """--plot's file: a format matplotlib writes, named by its suffix (none: png), checked before the runs
    are read, so that a typo costs no wait for W&B."""
    path = Path(value)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return path  # said when the plot is drawn
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise argparse.ArgumentTypeError(f"matplotlib writes no {path.suffix} file: name one {', '.join(formats)}")
    return path if path.suffix else path.with_suffix(".png")  # what matplotlib writes then


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_path", nargs="?", type=Path, help="the folder of the run folders (--output_path)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B's server instead")
    parser.add_argument("--sweep", metavar="ID", help="with --wandb: the runs of this sweep only")
    parser.add_argument("--timeout", type=options.Number(int, min=1), default=30, help="seconds W&B may take to answer")
    parser.add_argument("--metric", action="append", help="a metric to show (repeat for more); default: see above")
    parser.add_argument("--at", choices=(BEST, LAST), default=BEST, help="the epoch each run's metrics are read at")
    parser.add_argument("--format", choices=FORMATS, default="table", help="how the table is written")
    parser.add_argument(
        "--plot", type=plot_file, metavar="FILE.png", help="draw each group's curve of the first metric"
    )
    parser.add_argument("--replicates", type=options.Number(int, min=1), metavar="N", help="list the missing seeds")
    return parser


# ----------------------------------------------------------------------------------------------
# Cells


def number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def mean_std(s: Stats) -> str:
    return "-" if not s.n else number(s.mean) + ("" if s.n == 1 else f" ± {number(s.std)}")


def interval(s: Stats) -> str:
    return "-" if s.n < 2 else f"[{number(s.low)}, {number(s.high)}]"


def shown(value: object) -> str:
    """A hyper-parameter's value as on the command line."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "-" if value is None else str(value)


def runs_cell(g: Group) -> list[str]:
    repeats = f" (+{g.repeats} repeated seed{'s' if g.repeats > 1 else ''})" if g.repeats else ""
    return [str(g.finished) + repeats, str(g.failed) + (f" (+{g.running} running)" if g.running else "")]


# ----------------------------------------------------------------------------------------------
# Formats


def table(found: list[Group], columns: list[str], metrics: list[str], style: str) -> str:
    if style == "latex":
        return latex(found, columns, metrics)
    header = ["group", *columns, "finished", "failed", *COUNTED_TAGS]
    for m in metrics:
        header += [m, "95% CI"] if style != "csv" else [f"{m} {s}" for s in ("n", "mean", "std", "ci_low", "ci_high")]
    rows = []
    for g in found:
        row = [g.name, *(shown(g.config.get(c)) for c in columns), *runs_cell(g)]
        row += [str(g.tagged(kind)) for kind in COUNTED_TAGS]
        for m in metrics:
            s = g.stats[m]
            cells = [str(s.n), *("" if math.isnan(v) else repr(v) for v in (s.mean, s.std, s.low, s.high))]
            row += cells if style == "csv" else [mean_std(s), interval(s)]
        rows.append(row)
    if style == "markdown":
        return markdown_table(header, rows)
    if style == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *rows])
        return out.getvalue().rstrip("\n")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def latex(found: list[Group], columns: list[str], metrics: list[str]) -> str:
    """A booktabs table for a paper: mean ± std per metric, the best group's in bold."""

    def escape(text: str) -> str:
        return "".join("\\" + c if c in "&%$#_{}" else c for c in text)

    best = {}
    for m in metrics:
        means = [g.stats[m].mean for g in found if g.stats[m].n]
        best[m] = (max if higher_is_better(m) else min)(means) if means else None
    lines = [
        "\\begin{tabular}{" + "l" * (len(columns) or 1) + "r" + "c" * len(metrics) + "}",
        "\\toprule",
        " & ".join(map(escape, [*(columns or ["group"]), "runs", *metrics])) + " \\\\",
        "\\midrule",
    ]
    for g in found:
        cells = [escape(shown(g.config.get(c))) for c in columns] or [escape(g.name)]
        cells.append(str(g.finished))
        for m in metrics:
            s = g.stats[m]
            text = "--" if not s.n else f"{s.mean:.4f}" + ("" if s.n == 1 else f" $\\pm$ {s.std:.4f}")
            cells.append(f"\\textbf{{{text}}}" if s.n and s.mean == best[m] else text)
        lines.append(" & ".join(cells) + " \\\\")
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}"])


def render(found: list[Group], hyperparameters: list[str], metrics: list[str], style: str) -> str:
    columns, constant = varied(found, hyperparameters)
    above = ", ".join(f"{k}={shown(v)}" for k, v in constant.items())
    text = table(found, columns, metrics, style)
    if style in ("csv", "latex") or not above:
        return text
    return f"Every run: {above}\n\n{text}"


# ----------------------------------------------------------------------------------------------
# Curves and missing seeds


def plot(found: list[Group], hyperparameters: list[str], metric: str, path: Path) -> None:
    """Each group's curve of `metric` per epoch over its finished replicates: the mean, and a band of ±1
    standard deviation; the legend names the hyper-parameters that differ."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no window: this runs where no screen is, too
    import matplotlib.pyplot as plt

    columns, _ = varied(found, hyperparameters)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for g in found:
        by_epoch: dict[int, list[float]] = {}
        for runs_of_seed in g.seeds:  # one value a seed and epoch: the mean of its runs'
            of_seed: dict[int, list[float]] = {}
            for run in runs_of_seed:
                for row in run.history([metric]):
                    of_seed.setdefault(int(row["epoch"]), []).append(float(row[metric]))
            for epoch, values in of_seed.items():
                by_epoch.setdefault(epoch, []).append(statistics.fmean(values))
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
        label = ", ".join(f"{c}={shown(g.config.get(c))}" for c in columns) or g.name
        (line,) = axes.plot(epochs, means, label=f"{label} (n={g.finished})")
        band = list(zip(means, stds, strict=True))
        axes.fill_between(epochs, [m - s for m, s in band], [m + s for m, s in band], color=line.get_color(), alpha=0.2)
    axes.set_xlabel("epoch")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel(metric)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# Where a topped-up run goes and how it starts are the report's to say (--output_path, --wandb_project) or a
# new run's own (its seed, a fresh start, its device: the config holds the one "auto" chose).
NOT_COPIED = {"seed", "resume", "save", "output_path", "wandb_project", "device", "help"}


def top_up(found: list[Group], parser: options.Parser, wanted: int, where: list[str]) -> list[str]:
    """The commands that bring every group to `wanted` finished replicates: its hyper-parameters and the
    options its first run changed (its --data_path, say), and seeds none of its runs used."""
    hyperparameters, defaults = options.hyperparameter_names(parser), vars(parser.parse_args([]))
    commands = []
    for g in found:
        used = {run.config.get("seed") for run in g.runs}
        seeds = (s for s in range(10**9) if s not in used)
        flags = [
            word
            for group in options.option_groups(parser).values()
            for a in group.actions
            if a.dest not in NOT_COPIED
            and g.config.get(a.dest) is not None
            and (a.dest in hyperparameters or g.config[a.dest] != defaults.get(a.dest))
            for word in (f"--{a.dest}", shown(g.config[a.dest]))
        ]
        for _ in range(max(0, wanted - g.finished)):
            commands.append(shlex.join(["python", "main.py", *flags, *where, "--seed", str(next(seeds))]))
    return commands


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if (args.output_path is None) == (args.wandb is None):
        parser.error("give either OUTPUT_PATH (run folders) or --wandb ENTITY/PROJECT")
    if args.sweep and not args.wandb:
        parser.error("--sweep reads a sweep's runs from W&B: give --wandb ENTITY/PROJECT too")
    try:
        if args.wandb:
            runs, damaged = read_wandb(args.wandb, args.sweep, args.timeout), []
            where = ["--wandb_project", args.wandb.split("/")[-1]]
        else:
            if not args.output_path.is_dir():
                raise ReportError(f"{args.output_path} is not a folder")
            runs, damaged = read_folders(args.output_path)
            where = ["--save", "yes", "--output_path", str(args.output_path)]
    except ReportError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    for problem in damaged:
        print(f"Warning: skipped {problem}", file=sys.stderr)
    source = args.wandb or args.output_path
    if not runs:
        # A run that ends keeps its folder only with --save yes (or to be resumed): the default leaves none
        hint = "" if args.wandb else ": runs keep their folder with --save yes, or read W&B's (--wandb ENTITY/PROJECT)"
        print(
            f"Error: no runs found in {source}" + (f" ({len(damaged)} unreadable)" if damaged else "") + hint,
            file=sys.stderr,
        )
        return 1
    metrics = args.metric or default_metrics(runs)
    known = metrics_found(runs)
    unknown = [m for m in metrics if m not in known]
    if unknown and args.metric:
        parser.error(f"no run has the metric {', '.join(unknown)}; the runs have: {', '.join(known)}")
    metrics = [m for m in metrics if m in known]  # a default the runs lack (a fork dropped it) is left out
    if not metrics:
        print(f"Error: no run in {source} has an evaluated epoch: nothing to report", file=sys.stderr)
        return 1
    project = options.parser_of(HERE / "main.py")
    hyperparameters = options.hyperparameter_names(project)
    found = groups(runs, metrics, args.at)
    print(render(found, hyperparameters, metrics, args.format))
    for line in code_warnings(found):
        print(line, file=sys.stderr)
    if args.format in ("table", "markdown"):
        skipped = f"; {len(damaged)} unreadable run folders skipped" if damaged else ""
        print(f"\n{len(runs)} runs in {len(found)} groups{skipped}; metrics at each run's {args.at} epoch.")
        if repeats := sum(g.repeats for g in found):
            print(f"{repeats} of them repeated a seed of their group: one replicate a seed, the mean of its runs.")
    if args.plot:
        try:
            plot(found, hyperparameters, metrics[0], args.plot)
        except ImportError as e:
            print(f"Error: --plot needs matplotlib ({e}): pip install -r requirements-tools.txt", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"Error: {args.plot} could not be written ({e})", file=sys.stderr)
            return 1
    if args.replicates:
        commands = top_up(found, project, args.replicates, where)
        print(f"\n# {len(commands)} runs bring every group to {args.replicates} finished replicates:")
        print("\n".join(commands))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `report.py ... | head`: the reader has had enough (as Python's docs advise)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
