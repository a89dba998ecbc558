"""Sweeps: sweep.yaml, main.py as W&B's agent starts it, run_sweep.sh, and local_sweep.py (no server)."""

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps import utils as sweep_utils
from wandb.sdk.lib import config_util

import demo
import main
import utils
from boilerplate import options
from conftest import (
    OFFLINE,
    ROOT,
    WAIT,
    Output,
    epoch_rows,
    fork,
    group_of,
    processes_with,
    results,
    small_run,
    start_main,
    wandb_epochs,
    whole_epochs,
)
from wandb_file import find_run

with warnings.catch_warnings():  # sweeps 0.3 still uses a pydantic v1 option name
    warnings.simplefilter("ignore", UserWarning)
    import sweeps

SWEEP = yaml.safe_load((ROOT / "sweep.yaml").read_text())


def grid(config: dict) -> list[dict]:
    names = list(config["parameters"])
    values = [p["values"] if "values" in p else [p["value"]] for p in config["parameters"].values()]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def agent_flags(params: dict) -> list[str]:
    """The arguments W&B's agent passes, built by W&B's own code: --key=value, booleans as True/False."""
    return sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


# ----------------------------------------------------------------------------------------------
# sweep.yaml


def test_sweep_yaml_is_a_valid_wandb_sweep_of_main_py():
    assert sweeps.schema_violations_from_proposed_config(SWEEP) == []
    assert SWEEP["program"] == "main.py" and SWEEP["method"] == "grid"
    assert SWEEP["metric"]["name"].startswith("val/") and SWEEP["metric"]["goal"] == "maximize"
    assert SWEEP["metric"]["name"].split("/")[1] in utils.METRIC_NAMES
    assert len(SWEEP["parameters"]["seed"]["values"]) >= 3
    assert {"optimizer", "lr", "momentum", "lr_schedule"} <= set(SWEEP["parameters"])


def test_every_sweep_value_reaches_main_py_as_the_intended_number():
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # the pitfall: PyYAML reads this as a string
    parser = main.get_parser()
    kinds = {a.dest: getattr(a.type, "kind", str) for g in options.option_groups(parser).values() for a in g.actions}
    groups = {}
    for params in grid(SWEEP):
        assert set(params) <= set(kinds), "a sweep parameter main.py does not accept"
        opts = vars(parser.parse_args(agent_flags(params)))  # argparse exits the test on a bad value
        for name, value in params.items():
            assert type(value) is kinds[name] or (kinds[name] is float and type(value) is int), (name, value)
            assert opts[name] == value
        groups.setdefault(group_of(opts), []).append(params["seed"])
    assert len(grid(SWEEP)) == 48 and len(groups) == 16
    assert all(sorted(s) == [0, 1, 2] for s in groups.values())  # replicates share
    pruned = [p for p in grid(SWEEP) if utils.prune_hyperparameters(vars(parser.parse_args(agent_flags(p))), parser)]
    assert len(pruned) == 12 and all(p["optimizer"] == "adam" and p["momentum"] > 0 for p in pruned)


# ----------------------------------------------------------------------------------------------
# main.py under W&B's agent


@pytest.mark.every_python
def test_main_as_the_agent_starts_it_joins_the_sweep_grouped_and_tagged(tiny_data, tmp_path):
    # What wandb_agent.Agent._command_run does, with W&B's own code: the parameter file, WANDB_SWEEP_ID,
    # WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH, and `--key=value` arguments (booleans as True/False).
    # Offline, as no W&B server can be reached here.
    params = {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9, "seed": 4, "save": True, "abort_irrelevant": False}
    param_path = tmp_path / "wandb" / "sweep-sweep123" / "config-run123.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    env = {
        **OFFLINE,
        "WANDB_DIR": str(tmp_path),
        "WANDB_SWEEP_ID": "sweep123",
        "WANDB_RUN_ID": "run123",
        "WANDB_SWEEP_PARAM_PATH": str(param_path),
        "WANDB_PROJECT": "boilerplate-tests",
    }
    base = small_run(tiny_data, tmp_path / "out")
    proc = start_main(
        agent_flags(params) + [f"{k}={v}" for k, v in zip(base[::2], base[1::2], strict=True) if k not in ("--save",)],
        env=env,
    )
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    folder, res = results(tmp_path / "out")
    assert folder.name == "run123"
    run = find_run(tmp_path, "run123")
    assert run.sweep_id == "sweep123" and run.group == res["group"] and run.tags == ["Success"] and run.exit_code == 0
    assert run.config["lr"] == 0.01 and run.config["seed"] == 4 and run.config["group"] == res["group"]
    assert len(epoch_rows(run.history)) == 2


# ----------------------------------------------------------------------------------------------
# run_sweep.sh: N agents, Ctrl+C


def start_run_sweep(
    tmp_path, tiny_data, n_agents: int, n_runs: int, *options: str, program=ROOT / "main.py"
) -> subprocess.Popen:
    """run_sweep.sh with agents/agent_standin.py standing in for `wandb agent` (see its docstring: the
    real agent needs W&B's server for the parameters). The runs are long enough to be interrupted."""
    queue, bin_dir = tmp_path / "queue", tmp_path / "bin"
    queue.mkdir()
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "agent_standin.py"}" "$@"\n')
    # W&B's agent starts `python main.py`: that python must be the one running these tests, whether or
    # not its virtual environment is activated.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for shim in ("wandb", "python"):
        (bin_dir / shim).chmod(0o755)
    base = small_run(tiny_data, tmp_path / "out", "--epochs", "100000", "--verbose", "1", "--batch_size", "8")
    for i in range(n_runs):
        args = {k[2:]: {"value": v} for k, v in zip(base[::2], base[1::2], strict=True)} | {"seed": {"value": i}}
        (queue / f"{i}.json").write_text(json.dumps({"run_id": f"run{i}", "program": str(program), "args": args}))
    env = {
        **os.environ,
        **OFFLINE,
        "WANDB_DIR": str(tmp_path),
        "STANDIN_QUEUE": str(queue),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "WANDB_PROJECT": "boilerplate-tests",
    }
    return subprocess.Popen(
        [str(ROOT / "run_sweep.sh"), str(n_agents), "sweep123", *options],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_epochs(output: Output, runs: int) -> None:
    # the runs' summary lines come through the agents' output
    output.wait_for(lambda line: line.startswith("epoch 1/"), count=runs)


@pytest.mark.every_python
def test_one_ctrl_c_ends_every_run_with_user_abort_and_stops_the_agents(tiny_data, tmp_path):
    proc = start_run_sweep(tmp_path, tiny_data, n_agents=2, n_runs=4)
    try:
        output = Output(proc)
        wait_for_epochs(output, 2)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl+C: the foreground process group
        _, stderr = output.finish(90)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and not processes_with(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == ["0.taken", "1.taken", "2.json", "3.json"]
    for run_id in ("run0", "run1"):
        [path] = (tmp_path / "out").glob(f"*/{run_id}/results.json")
        res = json.loads(path.read_text())
        assert res["status"] == "failed" and "User abort" in res["tags"] and len(res["history"]) >= 1
        run = find_run(tmp_path, run_id)
        assert run.exit_code == 1 and "User abort" in run.tags
        assert wandb_epochs(run.history) == whole_epochs(res["history"])
        assert run.sweep_id == "sweep123"


def test_a_second_ctrl_c_ends_everything_at_once(tiny_data, tmp_path):
    proc = start_run_sweep(tmp_path, tiny_data, n_agents=2, n_runs=2)
    try:
        output = Output(proc)
        wait_for_epochs(output, 2)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = output.finish(30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130 and "ending every run now" in stderr
    deadline = time.monotonic() + 30
    while processes_with(str(tmp_path)) and time.monotonic() < deadline:  # the killed ones are being reaped
        time.sleep(0.1)
    assert not processes_with(str(tmp_path))


def test_agents_share_the_cores_and_gpus_pin_one_agent_to_each(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    show = tmp_path / "show_gpu.py"  # a run that says what it was given, and stays long enough for both
    show.write_text(
        "import os, pathlib, time\ntime.sleep(3)\n"
        "pathlib.Path(__file__).with_name(os.environ['WANDB_RUN_ID'] + '.gpu').write_text(\n"
        "    os.environ['CUDA_VISIBLE_DEVICES'] + ' ' + os.environ['OMP_NUM_THREADS'])\n"
    )
    _, stderr = Output(start_run_sweep(tmp_path, tiny_data, 2, 2, "--gpus", "3,5", program=show)).finish(120)
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores, shared by the two agents' runs
    assert sorted(path.read_text() for path in tmp_path.glob("*.gpu")) == [f"3 {share}", f"5 {share}"], stderr
    bad = subprocess.run(
        [str(ROOT / "run_sweep.sh"), "2", "sweep123", "--gpus", "zero"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "usage:" in bad.stderr


# ----------------------------------------------------------------------------------------------
# local_sweep.py: the same sweep files, no W&B server


def write_sweep(folder, parameters: dict, method: str = "grid", **extra):
    config = {
        "program": str(ROOT / "main.py"),
        "method": method,
        "metric": {"name": "val/accuracy", "goal": "maximize"},
        "parameters": parameters,
    } | extra
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_local_sweep(sweep, data, *options: str) -> subprocess.Popen:
    # In-process training (--watchdog no) halves each run's start-up; the sweep logic is what is tested here.
    main_args = [*demo.data_and_model(data), "--device", "cpu", "--verbose", "0", "--watchdog", "no"]
    env = {**os.environ, "WANDB_DIR": str(sweep.parent), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "local_sweep.py"), str(sweep), *options, "--", *main_args],
        cwd=sweep.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc, timeout=240) -> str:
    try:
        stdout, stderr = Output(proc).finish(timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    return stdout


def state(sweep) -> list[dict]:
    return json.loads(sweep.with_suffix(".state.json").read_text())["runs"]


def configs(runs) -> list[tuple]:
    return sorted(tuple(sorted(r["config"].items())) for r in runs)


def summary_rows(stdout: str) -> dict[str, list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_grid_runs_the_product_once_each_logs_offline_and_summarises_the_seeds(noise_data, tmp_path):
    # Shuffled training labels: validation accuracy is near chance and differs from seed to seed.
    sweep = write_sweep(
        tmp_path, {"lr": {"values": [0.001, 0.0001]}, "seed": {"values": [0, 1]}, "epochs": {"value": 1}}
    )
    stdout = finish(start_local_sweep(sweep, noise_data, "--workers", "2"))
    runs = state(sweep)
    assert configs(runs) == configs(
        [{"config": {"lr": lr, "seed": s, "epochs": 1}} for lr in (0.001, 0.0001) for s in (0, 1)]
    )
    rows = summary_rows(stdout)
    by_group = {}
    for run in runs:
        [path] = sweep.with_suffix(".runs").glob(f"{run['name']}/*/*/results.json")
        res = json.loads(path.read_text())
        assert res["status"] == run["status"] == "finished" and res["group"] == run["group"]
        by_group.setdefault(res["group"], []).append(res["best"]["best/val/accuracy"])  # the report's
        assert res["constants"]["torch/threads"] == int(
            os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2)
        )  # a share each
        wandb_run = find_run(tmp_path, run["name"])  # logged to W&B offline, grouped and tagged
        assert wandb_run.group == res["group"] and wandb_run.tags == res["tags"] and wandb_run.exit_code == 0
    assert len(by_group) == 2 and set(rows) == set(by_group)
    for group, values in by_group.items():
        # report.py's table: group, lr, finished, failed, overfitting, guessing, val/accuracy, its 95% CI, ...
        assert rows[group][6] == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
        assert rows[group][2:4] == ["2", "0"]
    assert len({v for values in by_group.values() for v in values}) > 1  # the figures are not all alike
    assert "Every run: epochs=1, " in stdout and ", lr=" not in stdout  # the constants, apart from the varied

    again = finish(start_local_sweep(sweep, noise_data, "--workers", "2"))  # done: nothing runs again
    assert "start" not in again and configs(state(sweep)) == configs(runs)


@pytest.mark.every_python
@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_search_stop_at_their_run_cap(method, tiny_data, tmp_path):
    # bayes fits a Gaussian process (scikit-learn, scipy) to the runs so far: the numpy it runs on is
    # the one requirements.txt pins, above the cap sweeps declares (see requirements-sweeps.txt).
    sweep = write_sweep(
        tmp_path,
        {"lr": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01}, "epochs": {"value": 1}},
        method=method,
        run_cap=3,
    )
    finish(start_local_sweep(sweep, tiny_data, "--workers", "2", "--wandb", "disabled"))
    runs = state(sweep)
    assert len(runs) == 3 and all(r["status"] == "finished" and r["metric"] is not None for r in runs)
    assert len({r["config"]["lr"] for r in runs}) == 3 and all(0.0001 <= r["config"]["lr"] <= 0.01 for r in runs)


def test_an_interrupted_sweep_resumes_without_repeating_a_run(tiny_data, tmp_path):
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1, 2]}, "epochs": {"value": 2}})
    proc = start_local_sweep(sweep, tiny_data, "--wandb", "disabled")
    output = Output(proc)
    output.wait_for(lambda line: line.startswith("start"), count=2)  # the first run has ended, the second began
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl+C
    _, stderr = output.finish(120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    first = state(sweep)
    assert len(first) == 1 and first[0]["status"] == "finished"  # the interrupted run is forgotten

    finish(start_local_sweep(sweep, tiny_data, "--wandb", "disabled"))
    runs = state(sweep)
    assert configs(runs) == configs([{"config": {"seed": s, "epochs": 2}} for s in (0, 1, 2)])
    assert first[0] in runs and all(r["status"] == "finished" for r in runs)


def test_a_sweep_whose_main_py_changed_between_sittings_says_so_at_the_end(tiny_data, tmp_path):
    """A researcher changes main.py's loss and runs the sweep again with a seed more: the group holds runs of
    two codes (a group is named by the hyper-parameters alone), and the closing table says so, as report.py
    does; a sweep of one code says nothing."""
    program = fork(tmp_path) / "main.py"
    sweep = write_sweep(tmp_path, {"seed": {"values": [0]}, "epochs": {"value": 1}}, program=str(program))
    stdout = finish(start_local_sweep(sweep, tiny_data, "--wandb", "disabled"))
    assert "| finished" in stdout and "Warning" not in stdout, stdout
    old = "    return F.cross_entropy(logits, labels)"
    program.write_text(program.read_text().replace(old, "    logits = logits + 0\n" + old))
    write_sweep(tmp_path, {"seed": {"values": [0, 1]}, "epochs": {"value": 1}}, program=str(program))
    stdout = finish(start_local_sweep(sweep, tiny_data, "--wandb", "disabled"))
    assert [r["config"]["seed"] for r in state(sweep)] == [0, 1]
    assert stdout.count("its replicates were trained by 2 versions of the code") == 1, stdout


def test_a_sweep_whose_output_nobody_reads_any_more_goes_on_to_its_end(tiny_data, tmp_path):
    """`local_sweep.py ... | head -1`: every line it prints after that meets a broken pipe. The sweep runs
    every configuration all the same, records each, and exits 0 without a traceback."""
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1]}, "epochs": {"value": 1}})
    proc = start_local_sweep(sweep, tiny_data, "--wandb", "disabled")
    try:
        assert proc.stdout.readline().startswith("start")
        proc.stdout.close()  # the reader goes
        proc.wait(120)
        stderr = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert [r["status"] for r in state(sweep)] == ["finished", "finished"]


def test_two_sweep_processes_share_a_sweep_without_running_a_configuration_twice(tiny_data, tmp_path):
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1, 2, 3]}, "epochs": {"value": 1}})
    procs = [start_local_sweep(sweep, tiny_data, "--wandb", "disabled") for _ in range(2)]
    outputs = [finish(proc) for proc in procs]
    runs = state(sweep)
    assert configs(runs) == configs([{"config": {"seed": s, "epochs": 1}} for s in range(4)])
    assert all(r["status"] == "finished" for r in runs)
    assert all("start" in out for out in outputs)  # both took part


def run_local_sweep(sweep, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "local_sweep.py"), str(sweep), *options], capture_output=True, text=True, timeout=60
    )


def test_a_killed_sweep_process_ends_its_runs(tiny_data, tmp_path):
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1]}, "epochs": {"value": 100000}})
    proc = start_local_sweep(sweep, tiny_data, "--workers", "2", "--wandb", "disabled")
    output = Output(proc)
    output.wait_for(lambda line: line.startswith("start"), count=2)
    pids = [run["pid"] for run in state(sweep)]
    deadline = time.monotonic() + WAIT
    while len(list(sweep.with_suffix(".runs").glob("*/*/*/results.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)  # until both are training (their results.json is written as training starts)
    proc.kill()  # SIGKILL: this process gets no chance to stop its runs itself
    output.finish(30)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)
    ends = [json.loads(path.read_text()) for path in sweep.with_suffix(".runs").glob("*/*/*/results.json")]
    assert len(ends) == 2 and all(res["tags"][-1] == "User abort" for res in ends)  # a run to run again


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_a_rerun_leaves_a_configuration_alone_while_an_orphaned_run_of_it_lives(tiny_data, tmp_path):
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1]}, "epochs": {"value": 1}})
    gone = subprocess.Popen(["true"])  # a local_sweep that has died: its pid is free
    gone.wait()
    orphan = subprocess.Popen(["sleep", "600"])  # its run, still ending
    try:
        sweep.with_suffix(".state.json").write_text(
            json.dumps(
                {
                    "runs": [
                        {
                            "name": "orphan",
                            "config": {"seed": 0, "epochs": 1},
                            "status": "running",
                            "owner": gone.pid,
                            "pid": orphan.pid,
                            "group": None,
                            "tags": [],
                            "metric": None,
                        }
                    ]
                }
            )
        )
        proc = start_local_sweep(sweep, tiny_data, "--wandb", "disabled")
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("end"))  # seed 1 has run; seed 0 waits for the orphan
        time.sleep(2)
        assert [r["config"]["seed"] for r in state(sweep)] == [0, 1] and proc.poll() is None
    finally:
        orphan.kill()
        orphan.wait()
    stdout, stderr = output.finish(120)
    assert proc.returncode == 0, stderr
    runs = state(sweep)
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1] and all(r["status"] == "finished" for r in runs)
    assert stdout.count("start") == 2


def test_a_rerun_after_a_kill_at_any_moment_finishes_every_configuration_exactly_once(tiny_data, tmp_path):
    """The state a kill leaves: a run claimed but never started (no pid: the kill came between the two),
    one that finished but was never recorded, one its local_sweep's death stopped, and the state file's
    own write cut short."""
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1, 2]}, "epochs": {"value": 1}})
    gone = subprocess.Popen(["true"])  # the killed local_sweep, and its finished runs: their pids are free
    gone.wait()
    runs_dir = sweep.with_suffix(".runs")

    def left(name: str, status: str, tags: list[str]) -> None:
        folder = runs_dir / name / "a-group" / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(
            json.dumps(
                {"status": status, "group": "a-group", "tags": tags, "history": [{"epoch": 1, "val/accuracy": 0.5}]}
            )
        )

    left("finished", "finished", ["Success"])
    left("stopped", "failed", ["User abort"])
    claimed = {"status": "running", "owner": gone.pid, "group": None, "tags": [], "metric": None}
    sweep.with_suffix(".state.json").write_text(
        json.dumps(
            {
                "runs": [
                    {**claimed, "name": "never-started", "config": {"seed": 0, "epochs": 1}, "pid": None},
                    {**claimed, "name": "finished", "config": {"seed": 1, "epochs": 1}, "pid": gone.pid},
                    {**claimed, "name": "stopped", "config": {"seed": 2, "epochs": 1}, "pid": gone.pid},
                ]
            }
        )
    )
    partial = tmp_path / ".sweep.state.json.x1y2z3.partial"
    partial.write_text('{"runs": [')
    stdout = finish(start_local_sweep(sweep, tiny_data, "--wandb", "disabled"), timeout=180)
    runs = state(sweep)
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1, 2] and all(r["status"] == "finished" for r in runs)
    assert stdout.count("start ") == 2 and "seed=1" not in stdout  # the finished one is kept, not run again
    assert next(r for r in runs if r["config"]["seed"] == 1)["name"] == "finished" and not partial.exists()


@pytest.mark.parametrize("after", [0.3, 1.5, 4.0])
def test_runs_a_killed_sweep_process_ends_at_any_moment_end_cleanly_and_a_rerun_completes_them(
    after, tiny_data, tmp_path
):
    sweep = write_sweep(tmp_path, {"seed": {"values": [0, 1]}, "epochs": {"value": 3}})
    proc = start_local_sweep(sweep, tiny_data, "--workers", "2", "--wandb", "disabled")
    output = Output(proc)
    output.wait_for(lambda line: line.startswith("start"), count=2)
    time.sleep(after)  # while the runs start (Python, torch, the data), or train
    pids = [run["pid"] for run in state(sweep)]
    proc.kill()
    output.finish(30)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in pids if pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = [path.read_text() for path in sweep.with_suffix(".runs").glob("*/output.log")]
    assert len(logs) == 2 and not any("Traceback" in log for log in logs), logs
    for path in sweep.with_suffix(".runs").glob("*/*/*/results.json"):  # what a run left claims no more than it is
        res = json.loads(path.read_text())
        assert res["status"] == "finished" or res["tags"][-1] == "User abort", res
    stdout = finish(start_local_sweep(sweep, tiny_data, "--workers", "2", "--wandb", "disabled"))
    runs = state(sweep)
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1] and all(r["status"] == "finished" for r in runs)
    assert stdout.count("start ") == 2 - len([r for r in runs if r["pid"] in pids])  # none finished twice


def test_a_damaged_state_file_is_named_with_what_to_do(tmp_path):
    sweep = write_sweep(tmp_path, {"seed": {"values": [0]}})
    sweep.with_suffix(".state.json").write_text('{"runs": [{"name": ')
    done = run_local_sweep(sweep)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"state file {sweep.with_suffix('.state.json')} is damaged" in done.stderr and "move it away" in done.stderr


def test_parameters_main_py_would_refuse_are_a_usage_error_before_any_run(tmp_path):
    sweep = write_sweep(
        tmp_path, {"hid": {"value": 32}, "lr": {"values": [0.1, "inf"]}, "optimizer": {"values": ["adam", "rmsprop"]}}
    )
    done = run_local_sweep(sweep)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    for problem in (
        "main.py has no option --hid",
        "--lr=inf: expected a finite float > 0",
        "--optimizer=rmsprop: not one of adam, sgd",
    ):
        assert problem in done.stderr
    assert not sweep.with_suffix(".runs").exists()
    no_value = run_local_sweep(write_sweep(tmp_path, {"lr": None}))  # `lr:` with nothing after it
    assert no_value.returncode == 2 and "needs value:, values: or a distribution" in no_value.stderr


def test_an_invalid_sweep_file_is_refused_with_exit_2(tmp_path):
    sweep = write_sweep(tmp_path, {"lr": {"values": "not a list"}}, method="sideways")
    done = subprocess.run(
        [sys.executable, str(ROOT / "local_sweep.py"), str(sweep)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "not a valid W&B sweep" in done.stderr and "Traceback" not in done.stderr
    upside_down = run_local_sweep(write_sweep(tmp_path, {"lr": {"min": 0.1, "max": 0.01}}, method="random", run_cap=2))
    assert upside_down.returncode == 2 and upside_down.stderr.count("min 0.1 is not less than max 0.01") == 1  # once
    # A program that is not there (run from another folder, a typo): every run would fail at once.
    elsewhere = write_sweep(tmp_path, {"lr": {"value": 0.1}}, program="train.py")
    done = run_local_sweep(elsewhere)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"its program train.py is not a file here ({Path.cwd()})" in done.stderr
    assert not elsewhere.with_suffix(".runs").exists()


def test_a_sweep_whose_runs_lack_its_metric_says_so(tiny_data, tmp_path):
    """A metric's name mistyped in the sweep file (val_accuracy): W&B says nothing, and a bayes search goes
    without it; here a warning at the first run that finishes, and the names the runs logged at the end.
    Runs that evaluated no epoch at all (here each declines its pruned combination) leave no table, and
    no traceback."""
    typo = write_sweep(tmp_path, {"epochs": {"value": 1}}, metric={"name": "val_accuracy", "goal": "maximize"})
    proc = start_local_sweep(typo, tiny_data, "--wandb", "disabled")
    stdout, stderr = Output(proc).finish(120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert stderr.count("Warning: the run finished without the sweep's metric val_accuracy") == 1, stderr
    assert "Warning: no run logged the sweep's metric val_accuracy; they logged" in stdout and "val/accuracy" in stdout
    declined = tmp_path / "declined"
    declined.mkdir()
    sweep = write_sweep(declined, {"optimizer": {"value": "adam"}, "momentum": {"values": [0.5, 0.9]}})
    stdout = finish(start_local_sweep(sweep, tiny_data, "--wandb", "disabled"))
    assert [run["status"] for run in state(sweep)] == ["failed", "failed"]  # Irrelevant hyperparameters
    assert "No run left results to report." in stdout and "Warning" not in stdout
