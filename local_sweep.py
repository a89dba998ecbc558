"""Run a W&B sweep file on this machine, with no W&B server: grid, random and bayes search as W&B does it.

    pip install -r requirements-tools.txt                       # sweeps: W&B's own search engine
    python local_sweep.py sweep.yaml --workers 2 -- --data_path ../shared/data
    python local_sweep.py sweep.yaml --wandb disabled           # no W&B at all, results files only
    wandb sync wandb/offline-run-*                               # later, from a machine that reaches W&B

The next configuration comes from `sweeps.next_run`, the engine behind W&B's sweep server, and each
run is the command W&B's agent would start (`python main.py --key=value ...`, built by W&B's own
code), plus the arguments after `--` and `--save yes`. Runs log to W&B in offline mode by default.
The state lives beside the sweep file (sweep.yaml -> sweep.state.json; each run's folder, with its
screen output in output.log, under sweep.runs/) and changes only under a file lock: re-running the
command continues where it stopped, never repeats a finished or failed run, and several processes
can share one sweep without running a configuration twice. Ctrl+C stops every running experiment
with User abort; those runs are run again next time. So does this process's death, even by SIGKILL
(on Linux): its runs end, and a rerun waits for any still ending, keeps what they finished, and runs
the rest again: whenever it was killed, every configuration is finished exactly once.
Runs at the same time share the cores: each gets OMP_NUM_THREADS = the cores this process may use
divided by --workers (unless OMP_NUM_THREADS is set already), so that they do not crowd each other out.
The sweep's parameters are checked against main.py's parser before the first run.
At the end it prints report.py's table of the sweep's runs: one row per group, the sweep metric's (and the
test metrics') mean, standard deviation and 95% confidence interval over the finished runs (the seeds),
at each run's best epoch, and how many runs finished and failed; and, as report.py does, a warning of a
group whose runs were trained by more than one version of the code (main.py changed between sittings).
Exit status: 0 the sweep is done (whatever its runs' tags), 1 its state file is damaged, 2 bad
command line or sweep file, 130 interrupted by Ctrl+C.
"""

import argparse
import contextlib
import fcntl
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

import report
import utils
from boilerplate import options, output, replicates, watch
from boilerplate.files import remove_partial_writes, write_json

POLL_SECONDS = 0.5


# ----------------------------------------------------------------------------------------------
# State: one JSON file beside the sweep, read and written under an exclusive lock


class DamagedState(Exception):
    """The sweep's state file cannot be read; the message says what to do."""


@contextlib.contextmanager
def locked_state(path: Path):
    """The sweep's state, locked against the other local_sweep processes until the block ends."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_partial_writes(path.parent, path.name)  # a write a kill cut short
        try:
            state = json.loads(path.read_text()) if path.exists() else {"runs": []}
            if not isinstance(state.get("runs"), list):
                raise ValueError("no list of runs")
        except (ValueError, AttributeError) as e:
            raise DamagedState(
                f"the sweep's state file {path} is damaged ({e}). It records which runs have "
                "run: mend it, or move it away to start the sweep afresh (every run then runs "
                "again)."
            ) from None
        yield state
        write_json(path, state)


def alive(pid: int | None) -> bool:
    if not pid:  # never recorded (a kill between claiming a run and starting it): os.kill(0) would say yes
        return False
    with contextlib.suppress(OSError, IndexError):  # Linux: a zombie (ended, not yet reaped) is no run
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def orphans_alive(state: dict) -> bool:
    """Whether a run whose local_sweep is gone was still running (ending: see start()) when settle_orphans
    looked. Not asked again here: a process that ends in between must not read as neither (it waits)."""
    return any(r["status"] == "running" and not alive(r["owner"]) for r in state["runs"])


def settle_orphans(state: dict, runs_dir: Path, metric: str) -> None:
    """Runs left "running" by a local_sweep that is gone: once their process has ended too, what they
    finished (or failed for good) is recorded from their folder, as record_end would have; the rest (not
    started, or stopped by that local_sweep's end) is forgotten, to run again. One still alive keeps its
    configuration taken."""
    kept = []
    for run in state["runs"]:
        if run["status"] == "running" and not alive(run["owner"]) and not alive(run.get("pid")):
            result = outcome(runs_dir / run["name"], metric)
            if result["status"] == "running" or result.get("resumable", True):
                continue
            run.update(result)
        kept.append(run)
    state["runs"] = kept


def propose(config: dict, state: dict):
    """The next configuration W&B's engine proposes given every run so far, or None when done."""
    import sweeps

    if "run_cap" in config and len(state["runs"]) >= config["run_cap"]:
        return None
    runs = [
        sweeps.SweepRun(
            name=r["name"],
            state=r["status"] if r["status"] != "interrupted" else "failed",
            config={k: {"value": v} for k, v in r["config"].items()},
            summary_metrics={} if r["metric"] is None else {config["metric"]["name"]: r["metric"]},
        )
        for r in state["runs"]
    ]
    proposal = sweeps.next_run(config, runs)
    return None if proposal is None else {k: v["value"] for k, v in proposal.config.items()}


WAIT = "wait"  # claim(): nothing to start now, but a run of a dead local_sweep may yet free its configuration


def claim(config: dict, state_path: Path, runs_dir: Path) -> tuple[str, dict] | str | None:
    """A name and the next configuration, recorded as running under the lock (so no other process
    proposes it now); WAIT while only orphaned runs still hold configurations; None when done."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with locked_state(state_path) as state:
        settle_orphans(state, runs_dir, config["metric"]["name"])
        params = propose(config, state)
        if params is None:
            return WAIT if orphans_alive(state) else None
        state["runs"].append(
            {
                "name": name,
                "config": params,
                "status": "running",
                "owner": os.getpid(),
                "pid": None,
                "group": None,
                "tags": [],
                "metric": None,
            }
        )
    return name, params


# ----------------------------------------------------------------------------------------------
# Runs: the command W&B's agent would start, one process group each


def agent_argv(
    params: dict, program: str, template: list | None = None, interpreter: str = sys.executable
) -> list[str]:
    """The command W&B's agent starts for `params`: the sweep's command template (W&B's default:
    ${env} ${interpreter} ${program} ${args}) filled in by W&B's own code, so the values reach the
    program exactly as under the agent (--lr=0.001, --flag=True)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    words = {
        **sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}}),
        "env": ["/usr/bin/env"],
        "interpreter": [interpreter],
        "program": [program],
    }
    argv = []
    for word in sweep_utils.create_sweep_command(template):
        argv += words.get(word[2:-1], []) if word.startswith("${") else [word]
    return argv


def command(config: dict, params: dict, extra: list[str], output: Path, mode: str, project: str) -> list[str]:
    """A run of the sweep as the agent would start it, plus main.py's arguments after `--`, its folder,
    and W&B offline unless disabled."""
    wandb = ["--wandb_project", project] if mode == "offline" else []
    return (
        agent_argv(params, config["program"], config.get("command"))
        + extra
        + wandb
        + ["--save", "yes", "--output_path", str(output)]
    )


def outcome(output: Path, metric: str) -> dict:
    """Group, status, tags and the sweep metric (its last logged value, as in W&B's summary), from
    the run's results.json, and whether --resume could continue it; a run that left none (it could not
    start, or was stopped before it began) failed."""
    found = sorted(output.glob("*/*/results.json"))
    if not found:
        return {"status": "failed", "group": None}
    results = json.loads(found[0].read_text())
    values = [row[metric] for row in results["history"] if isinstance(row.get(metric), (int, float))]
    return {
        "status": results["status"],
        "group": results["group"],
        "tags": results["tags"],
        "metric": values[-1] if values else None,
        "resumable": utils.resumable(results["tags"]),
    }


def own_group_stopped_with(parent: int) -> None:
    """In the run's process before it starts: a process group of its own (Popen's process_group
    needs Python 3.11), and a Ctrl+C of its own when this process dies, held back until main.py can act
    on it (a SIGINT as Python starts would be a KeyboardInterrupt traceback)."""
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    watch.stop_with_parent(parent, signal.SIGINT)


def start(name: str, params: dict, argv: list[str], runs_dir: Path, env: dict, state_path: Path) -> subprocess.Popen:
    """Starts a run in a process group of its own, as W&B's agent does, its screen in output.log, and
    records its pid: a rerun leaves its configuration alone while it is alive."""
    print(f"start {name}: " + " ".join(f"{k}={v}" for k, v in params.items()), flush=True)
    (runs_dir / name).mkdir(parents=True)
    with open(runs_dir / name / "output.log", "w") as log:
        proc = subprocess.Popen(
            argv,
            env={**env, "WANDB_RUN_ID": name},
            stdout=log,
            stderr=log,
            preexec_fn=functools.partial(own_group_stopped_with, os.getpid()),
        )
    with locked_state(state_path) as state:
        next(r for r in state["runs"] if r["name"] == name)["pid"] = proc.pid
    return proc


def record_end(name: str, output: Path, metric: str, state_path: Path, interrupted: bool) -> None:
    result = outcome(output, metric)
    if interrupted and result["status"] != "finished":
        result = {"status": "interrupted"}  # stopped by us: it runs again next time
    result.pop("resumable", None)
    with locked_state(state_path) as state:
        run = next(r for r in state["runs"] if r["name"] == name)
        run.update(result)
    print(f"end   {name}: {run['status']} {', '.join(run['tags'])}".rstrip(), flush=True)
    if run["status"] == "finished" and run.get("metric") is None:
        metric_missing(metric)


@functools.cache  # said once, at the first run that finished without it
def metric_missing(metric: str) -> None:
    print(
        f"Warning: the run finished without the sweep's metric {metric}: a bayes search cannot use it, nor the "
        "summary (which lists the metrics the runs have)",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# The summary: one row per group


def summary(config: dict, runs: list[dict], runs_dir: Path) -> str:
    """report.py's table (Markdown) of the sweep's finished and failed runs, the sweep's metric first, and
    how many runs left no results (they could not start)."""
    found = [run for r in runs for run in replicates.read_folders(runs_dir / r["name"])[0]]
    known = replicates.metrics_found(found)
    metrics = [m for m in dict.fromkeys([config["metric"]["name"], *replicates.default_metrics(found)]) if m in known]
    hyperparameters = options.hyperparameter_names(main_parser())
    text = "No run left results to report."
    if found and metrics:
        ranked = replicates.groups(found, metrics, replicates.BEST)
        table = report.render(ranked, hyperparameters, metrics, "markdown")
        text = "\n\n".join([table, *replicates.code_warnings(ranked)])  # a main.py changed between sittings
    if known and config["metric"]["name"] not in known:  # a typo (val_accuracy): W&B would say nothing either
        text = (
            f"Warning: no run logged the sweep's metric {config['metric']['name']}; they logged "
            f"{', '.join(known)}\n\n{text}"
        )
    lost = sum(r.get("group") is None for r in runs)
    return text + (f"\n\n{lost} runs left no results (they could not start): see their output.log" if lost else "")


# ----------------------------------------------------------------------------------------------


def load_sweep(path: Path, parser: argparse.ArgumentParser) -> dict:
    import sweeps

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read the sweep file {path}: {e}")
    try:
        problems = sweeps.schema_violations_from_proposed_config(config) if isinstance(config, dict) else ["not a map"]
    except ValueError as e:  # a parameter with no value (`lr:`) is an exception there, not a violation
        problems = [f"{e} (each needs value:, values: or a distribution)"]
    if not problems and not {"program", "metric"} <= config.keys():
        problems = ["local_sweep.py needs `program` and `metric`"]
    if problems:
        parser.error(f"{path} is not a valid W&B sweep: " + "; ".join(dict.fromkeys(problems)))
    if config["method"] == "random" and "run_cap" not in config:
        parser.error(f"{path}: a random search never ends by itself; set run_cap")
    program = Path(config["program"])
    if "${program}" in config.get("command", ["${program}"]) and not program.is_file():
        # Every run would fail at once: W&B's agent too starts it from the folder it runs in.
        parser.error(f"{path}: its program {program} is not a file here ({Path.cwd()}): run local_sweep.py where it is")
    if Path(config["program"]).name == "main.py" and (
        problems := parameter_problems(config["parameters"], main_parser())
    ):
        parser.error(f"{path}: " + "; ".join(problems))
    return config


def main_parser() -> options.Parser:
    """main.py's parser, read without loading torch (options.parser_of)."""
    return options.parser_of(Path(__file__).resolve().parent / "main.py")


def parameter_problems(parameters: dict, main_parser: options.Parser) -> list[str]:
    """What main.py would refuse in every run: an unknown option, a listed value its parser rejects."""
    actions = {a.dest: a for group in options.option_groups(main_parser).values() for a in group.actions}
    problems = []
    for name, spec in parameters.items():
        if name not in actions:
            problems.append(f"main.py has no option --{name}")
            continue
        for value in spec.get("values", [spec["value"]] if "value" in spec else []):
            try:
                parsed = actions[name].type(str(value)) if actions[name].type else str(value)
                if actions[name].choices and parsed not in actions[name].choices:
                    raise argparse.ArgumentTypeError(f"not one of {', '.join(map(str, actions[name].choices))}")
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                problems.append(f"--{name}={value}: {e}")
    return problems


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict, list[str]]:
    """Options, the sweep, and main.py's own arguments (those after `--`)."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        usage="%(prog)s SWEEP.yaml [options] [-- main.py options]",
    )
    parser.add_argument("sweep", type=Path, help="a W&B sweep file, e.g. sweep.yaml")
    parser.add_argument("--workers", type=options.Number(int, min=1), default=1, help="runs at the same time")
    parser.add_argument(
        "--wandb",
        choices=("offline", "disabled"),
        default="offline",
        help="offline: each run logs to W&B offline, to upload with `wandb sync`",
    )
    parser.add_argument("--project", help="W&B project (default: the sweep's `project`, else the file's name)")
    args = parser.parse_args(ours)
    with warnings.catch_warnings():  # sweeps 0.3 still uses a pydantic v1 option name
        warnings.simplefilter("ignore", UserWarning)
        config = load_sweep(args.sweep, parser)
    args.project = args.project or config.get("project") or args.sweep.stem
    return args, config, extra


def main(argv: list[str] | None = None) -> int:
    args, config, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return sweep(args, config, extra)
    except DamagedState as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


def sweep(args: argparse.Namespace, config: dict, extra: list[str]) -> int:
    state_path, runs_dir = args.sweep.with_suffix(".state.json"), args.sweep.with_suffix(".runs")
    metric = config["metric"]["name"]
    env = {**os.environ, "WANDB_MODE": args.wandb, "WANDB_SILENT": "true"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // args.workers)))
    env.pop("WANDB_SWEEP_ID", None)  # main.py would take the run for a server sweep's

    running = {}  # run name -> its process; each in a process group of its own, as under W&B's agent,
    # so that a terminal's Ctrl+C reaches this process only and each run gets exactly one SIGINT
    interrupted = exhausted = False
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while running or not exhausted:
            try:
                while not exhausted and len(running) < args.workers:
                    claimed = claim(config, state_path, runs_dir)
                    exhausted = claimed is None
                    if claimed in (None, WAIT):
                        break
                    name, params = claimed
                    running[name] = start(
                        name,
                        params,
                        command(config, params, extra, runs_dir / name, args.wandb, args.project),
                        runs_dir,
                        env,
                        state_path,
                    )
                time.sleep(POLL_SECONDS)
                for name in [n for n, proc in running.items() if proc.poll() is not None]:
                    del running[name]
                    record_end(name, runs_dir / name, metric, state_path, interrupted)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = exhausted = True
                print(
                    "Stopping: each running experiment ends at its next batch with User abort and will run "
                    "again next time. Ctrl+C again to kill them at once.",
                    file=sys.stderr,
                    flush=True,
                )
                for proc in running.values():
                    proc.send_signal(signal.SIGINT)
    except KeyboardInterrupt:
        for proc in running.values():
            proc.kill()
    finally:
        signal.signal(signal.SIGINT, previous)

    with locked_state(state_path) as state:
        settle_orphans(state, runs_dir, metric)
        state["runs"] = [r for r in state["runs"] if r["status"] != "interrupted"]
        done = [r for r in state["runs"] if r["status"] in ("finished", "failed")]
    print(summary(config, done, runs_dir))
    return 130 if interrupted else 0


if __name__ == "__main__":
    output.outlive_readers()  # `| head`, or a tee that a Ctrl+C ended: the sweep goes on, and records its runs
    sys.exit(main())
