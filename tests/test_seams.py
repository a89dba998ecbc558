"""The seams a fork changes, proven on forks: a 3-class dataset that is not images and a second model,
plugged in through load_data and build_model only; a metric added to utils.METRICS; the DataLoader
path for data that does not fit; and mistakes that fail before the first epoch."""

import ast
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import demo
import utils
from conftest import (
    OFFLINE,
    ROOT,
    Output,
    copy_project,
    epoch_rows,
    results,
    small_run,
    start_main,
    wandb_epochs,
    whole_epochs,
    without_times,
)
from wandb_file import find_run, whole_run

POINTS_DATA = '''
def load_data(args: Namespace) -> Data:
    """Points in 5 dimensions, 3 classes, from points.csv under --data_path; no official test split."""
    rows = np.loadtxt(Path(args.data_path) / "points.csv", delimiter=",", dtype=np.float32)
    splits = {"train": TensorDataset(torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, -1]).long())}
    splits["train"], splits["test"] = hold_out(splits["train"], 60)
    return Data(splits, classes=["low", "mid", "high"], input_shape=(5,))
'''
POINTS_IMPORTS = [
    ("from boilerplate.batches import Data\n", "import numpy as np\n\nfrom boilerplate.batches import Data, hold_out\n")
]
SECOND_MODEL = '''
def build_model(args: Namespace, data: Data) -> nn.Module:
    """One tanh layer, 16 wide: no flag of the demo's model is needed."""
    return nn.Sequential(nn.Linear(data.input_shape[0], 16), nn.Tanh(), nn.Linear(16, len(data.classes)))
'''


def fork(tmp_path: Path, functions: dict[str, str] = (), edits: dict[str, list[tuple[str, str]]] = ()) -> Path:
    """A copy of the project: main.py's `functions` replaced by new source, and in each file of `edits`
    each (old, new) text replaced."""
    folder = copy_project(tmp_path / "fork")
    lines = (folder / "main.py").read_text().splitlines(keepends=True)
    spans = {
        node.name: (node.lineno - 1 - len(node.decorator_list), node.end_lineno)
        for node in ast.parse("".join(lines)).body
        if isinstance(node, ast.FunctionDef)
    }
    for name, source in sorted(dict(functions).items(), key=lambda item: -spans[item[0]][0]):
        start, end = spans[name]
        lines[start:end] = [source.strip("\n") + "\n"]
    (folder / "main.py").write_text("".join(lines))
    for name, pairs in dict(edits).items():
        text = (folder / name).read_text()
        for old, new in pairs:
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        (folder / name).write_text(text)
    return folder


def write_points(folder: Path, learnable: bool) -> Path:
    """300 points: 3 well separated clouds, or (not learnable) the same points with shuffled labels."""
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    points = rng.normal(0, 0.3, (300, 5)) + np.eye(3, 5)[labels] * 3
    if not learnable:
        labels = rng.permutation(labels)
    folder.mkdir(parents=True)
    np.savetxt(folder / "points.csv", np.column_stack([points, labels]), delimiter=",")
    return folder


def points_run(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data_path",
        str(data),
        "--val_size",
        "40",
        "--batch_size",
        "8",
        "--epochs",
        "4",
        "--device",
        "cpu",
        "--verbose",
        "1",
        "--save",
        "yes",
        "--output_path",
        str(out),
        *extra,
    ]


def run_fork(folder: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(folder / "main.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **OFFLINE, "WANDB_DIR": str(tmp_path)},
    )


def test_a_3_class_tabular_dataset_and_another_model_through_the_seams_only(tmp_path):
    folder = fork(tmp_path, {"load_data": POINTS_DATA, "build_model": SECOND_MODEL}, {"main.py": POINTS_IMPORTS})
    learnable, noise = write_points(tmp_path / "points", True), write_points(tmp_path / "noise", False)

    done = run_fork(folder, points_run(learnable, tmp_path / "out", "--wandb_project", "boilerplate-tests"), tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    run_folder, res = results(tmp_path / "out")
    assert res["tags"] == ["Success"] and res["history"][-1]["test/accuracy"] > 0.9
    constants = res["constants"]  # the baselines follow the data's 3 classes
    assert (
        constants["test/random_accuracy"] == pytest.approx(1 / 3)
        and constants["data/classes"] == ["low", "mid", "high"]
        and constants["data/test_size"] == 60
        and constants["data/val_size"] == 40
    )
    assert constants["model/parameters"] == 5 * 16 + 16 + 16 * 3 + 3
    wandb_run = find_run(tmp_path, run_folder.name)
    assert wandb_run.exit_code == 0 and wandb_run.config["data/classes"] == ["low", "mid", "high"]

    done = run_fork(folder, points_run(noise, tmp_path / "noise-out"), tmp_path)  # a model at chance on 3 classes
    assert done.returncode == 0, done.stderr
    assert "Random guessing accuracy (test)" in results(tmp_path / "noise-out")[1]["tags"]

    # Resume: preempted after epoch 2 (SIGTERM to the job), continued, equal to a run never stopped.
    slow = points_run(learnable, tmp_path / "stopped", "--batch_size", "1", "--epochs", "6")
    proc = subprocess.Popen(
        [sys.executable, str(folder / "main.py"), *slow],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and results(tmp_path / "stopped")[1]["tags"] == ["Preempted"], stderr
    assert run_fork(folder, [*slow, "--resume", "yes"], tmp_path).returncode == 0
    assert (
        run_fork(
            folder, points_run(learnable, tmp_path / "whole", "--batch_size", "1", "--epochs", "6"), tmp_path
        ).returncode
        == 0
    )
    resumed, whole = (results(tmp_path / name)[1]["history"] for name in ("stopped", "whole"))
    assert len(whole) == 6 and without_times(resumed) == without_times(whole)

    # The README generator reads the same tables.
    done = subprocess.run(
        [sys.executable, "generate_readme_stub.py"], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Random guessing METRIC (SPLIT)" in (folder / "README.md").read_text()


def test_a_metric_added_to_the_table_is_computed_and_one_without_baselines_is_skipped(tiny_data, tmp_path):
    row = '    Metric("precision", "multiclass_precision", (("average", "macro"),), "precision, macro"),\n'
    folder = fork(tmp_path, edits={"utils.py": [("METRICS = (\n", "METRICS = (\n" + row)]})
    done = run_fork(folder, small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests"), tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    run_folder, res = results(tmp_path / "out")
    assert res["tags"] == ["Success"] and all(f"{s}/precision" in res["history"][-1] for s in ("train", "val", "test"))
    assert "test/random_precision" not in res["constants"]
    assert "test/precision" in epoch_rows(find_run(tmp_path, run_folder.name).history)[-1]
    stub = subprocess.run(
        [sys.executable, "generate_readme_stub.py"], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert stub.returncode == 0 and "`precision`" in (folder / "README.md").read_text()


def test_a_metric_removed_from_the_table_leaves_logging_resume_and_the_detectors_working(tiny_data, tmp_path):
    """Whether an epoch was evaluated is a fact of its row, not a metric's presence: a fork that keeps F1
    alone logs each epoch to W&B once, checkpoints it, resumes after a preemption, and tags the run."""
    accuracy = utils.METRICS[0]
    assert accuracy.name == "accuracy"
    source = (ROOT / "utils.py").read_text()
    start = source.index('    Metric(\n        "accuracy",')
    block = source[start : source.index("    Metric(", start + 1)]
    folder = fork(tmp_path, edits={"utils.py": [(block, "")]})
    argv = small_run(tiny_data, tmp_path / "out", "--batch_size", "4", "--epochs", "8", "--verbose", "1")
    argv += ["--wandb_project", "boilerplate-tests"]
    proc = start_main(argv, script=folder / "main.py", env={**OFFLINE, "WANDB_DIR": str(tmp_path)})
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 1/"))
        os.killpg(proc.pid, signal.SIGTERM)  # a preemption: the run stops, resumable
        _, stderr = output.finish(60)
    finally:
        proc.kill()
    run_folder, res = results(tmp_path / "out")
    assert res["tags"][-1] == "Preempted" and (run_folder / "checkpoint.pt").exists(), stderr
    done = run_fork(folder, [*argv, "--resume", "yes"], tmp_path)
    assert done.returncode == 0 and "Resuming the run in" in done.stderr, done.stderr
    _, res = results(tmp_path / "out")
    assert res["tags"][0] == "Success" and whole_epochs(res["history"]) == list(range(1, 9))
    assert "test/accuracy" not in res["history"][-1] and "test/f1" in res["history"][-1]
    wandb_run = whole_run(tmp_path, run_folder.name)
    assert wandb_epochs(wandb_run.history) == list(range(1, 9)) and wandb_run.exit_code == 0


OWN_SCHEDULE = '''
def build_schedule(args: Namespace, optimizer: torch.optim.Optimizer, steps: int):
    """A schedule of the fork's own: linear from lr to lr / 10 over the run."""
    return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=steps)
'''


def test_a_scheduler_added_to_the_training_state_resumes_exactly(tiny_data, tmp_path):
    """One place makes the schedule (build_schedule): the checkpoint keeps it, and a run preempted mid-way
    resumes to the very history of a run never stopped (its learning rate where the schedule had it)."""
    folder = fork(tmp_path, {"build_schedule": OWN_SCHEDULE})
    argv = small_run(tiny_data, tmp_path / "stopped", "--batch_size", "2", "--epochs", "4", "--verbose", "1")
    proc = start_main(argv, script=folder / "main.py")
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = output.finish(60)
    finally:
        proc.kill()
    assert results(tmp_path / "stopped")[1]["tags"] == ["Preempted"], stderr
    done = run_fork(folder, [*argv, "--resume", "yes"], tmp_path)
    assert done.returncode == 0 and "Resuming the run in" in done.stderr, done.stderr
    whole = small_run(tiny_data, tmp_path / "whole", "--batch_size", "2", "--epochs", "4")
    assert run_fork(folder, whole, tmp_path).returncode == 0
    resumed, expected = (results(tmp_path / name)[1]["history"] for name in ("stopped", "whole"))
    assert len(expected) == 4 and without_times(resumed) == without_times(expected)
    assert [row["train/lr"] for row in expected] == pytest.approx([7.75e-4, 5.5e-4, 3.25e-4, 1e-4])


@pytest.mark.parametrize("mistake", ["model", "metric", "metric of the scores"])
def test_a_model_that_does_not_fit_the_data_or_a_broken_metric_fails_before_the_first_epoch(
    mistake, tiny_data, tmp_path
):
    if mistake == "model":  # sized for another input: 10 features where the data has 28 x 28
        folder = fork(
            tmp_path,
            {
                "build_model": """
def build_model(args: Namespace, data: Data) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(10, len(data.classes)))
"""
            },
        )
    elif mistake == "metric":  # a torcheval function that does not exist
        broken = 'METRICS = (\n    Metric("auc", "no_such", (), "x"),\n'
        folder = fork(tmp_path, edits={"utils.py": [("METRICS = (\n", broken)]})
    else:  # AUROC reads scores, and predictions_of still gives one class a sample
        broken = 'METRICS = (\n    Metric("auroc", "multiclass_auroc", (), "x"),\n'
        folder = fork(tmp_path, edits={"utils.py": [("METRICS = (\n", broken)]})
    done = run_fork(folder, small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests"), tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "failed before training" in done.stderr and str(demo.INPUT_SHAPE) in done.stderr
    assert f"{demo.CLASSES} classes" in done.stderr
    assert ("needs predictions_of to return them" in done.stderr) == (mistake == "metric of the scores")
    assert "Crashed" not in done.stdout + done.stderr and "--resume" not in done.stdout + done.stderr
    assert not list((tmp_path / "out").rglob("*")) and not list(tmp_path.glob("wandb/*run-*"))  # nothing left


def test_the_dataloader_path_with_workers_learns_stops_on_ctrl_c_and_resumes_exactly(tiny_data, tmp_path):
    args = [*small_run(tiny_data, tmp_path / "stopped", "--epochs", "6", "--verbose", "1", "--workers", "2")]
    whole = start_main([*small_run(tiny_data, tmp_path / "whole", "--epochs", "6", "--workers", "2")])
    _, stderr = whole.communicate(timeout=120)
    assert whole.returncode == 0, stderr
    proc = start_main(args)
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl+C reaches the loader's workers too
        stdout, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in stderr and "Crashed" not in stdout + stderr, stderr
    assert results(tmp_path / "stopped")[1]["tags"][-1] == "User abort"
    resumed = start_main([*args, "--resume", "yes"])
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    expected, res = results(tmp_path / "whole")[1], results(tmp_path / "stopped")[1]
    assert expected["tags"] == res["tags"] == ["Success"] and expected["history"][-1]["test/accuracy"] > 0.9
    assert without_times(res["history"]) == without_times(expected["history"])
    assert whole_epochs(res["history"]) == list(range(1, 7))


# The README's invitation taken: the fork's own wandb.log at the batch loop's marked spot (YOUR LOGGING), every batch.
OWN_WANDB_LOG = {
    "main.py": [
        ("import torch\n", "import torch\nimport wandb\n"),
        (
            "        optimizer.step()\n",
            '        optimizer.step()\n        wandb.log({"test_only/lr": optimizer.param_groups[0]["lr"]})\n',
        ),
    ]
}


def test_a_forks_own_wandb_log_in_the_batch_loop_leaves_its_tests_and_its_run_working(tiny_data, tmp_path):
    """The README's invitation taken: a wandb.log at the batch loop's marked spot (YOUR LOGGING), of a value
    already on the host (no read of the device). The fork's own copy of the tests that call train_epoch
    straight pass, and its real run logs the fork's rows and each epoch once."""
    folder = fork(tmp_path, edits=OWN_WANDB_LOG)
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pytest.ini", folder / "pytest.ini")
    straight = "batch_loop or witness or host_looks or statistics_are or frozen_layer"
    tests = ["tests/test_syncs.py", "tests/test_training.py", "-k", straight]
    done = subprocess.run(
        # -n 0: one process, in this test's share of the cores (pytest.ini's -n auto would start 4 more)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *tests],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-4000:]

    argv = small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests")
    done = run_fork(folder, argv, tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    run_folder, res = results(tmp_path / "out")
    wandb_run = whole_run(tmp_path, run_folder.name)
    assert wandb_epochs(wandb_run.history) == whole_epochs(res["history"]) == [1, 2]
    assert sum("test_only/lr" in row for row in wandb_run.history) == 2 * res["history"][0]["train/batches"]
