"""Fault injection on real `python main.py` processes: real signals at several points of a run, a NaN
in the weights, W&B unreachable. After each: the tags, the status, results.json whole, W&B's record.

Points: "first epoch" (the first epoch's batch bar has appeared), "between epochs" (an epoch's summary
line has just been printed: the watcher is saving results.json, the training process its checkpoint),
and "evaluation" (an epoch's training time after a summary line: on this data evaluation takes about
as long as training, so the signal lands in the next epoch's evaluation or near it).
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (OFFLINE, Output, digits, make_dataset, results, small_run, start_main, training_process,
                      without_times, write_idx)
from wandb_file import find_runs

EPOCHS = 4


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory) -> Path:
    """Easy digits with a large test set, so that evaluation takes a good share of each epoch."""
    folder, rng = tmp_path_factory.mktemp("faults"), np.random.default_rng(1)
    for prefix, n in (("train", 1500), ("t10k", 16000)):
        write_idx(folder, prefix, *digits(n, rng))
    return folder


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--val_size", "100", "--batch_size", "8", "--hidden", "1024",
            "--epochs", str(EPOCHS), "--device", "cpu", "--save", "yes", "--output_path", str(out),
            "--wandb_project", "boilerplate-tests", "--verbose", "2", *extra]


def launch(argv: list[str], wandb_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """main.py with W&B offline into `wandb_dir`, its output on stdout with its errors."""
    return start_main(argv, cwd=wandb_dir, env={**OFFLINE, "WANDB_DIR": str(wandb_dir), **(env or {})},
                      stderr=subprocess.STDOUT)


def run(argv: list[str], wandb_dir: Path, env: dict | None = None) -> tuple[int, str]:
    proc = launch(argv, wandb_dir, env)
    output, _ = Output(proc).finish(300)
    return proc.returncode, output


@pytest.fixture(scope="module")
def uninterrupted(fault_data, tmp_path_factory) -> tuple[dict, dict, float]:
    """The run as it goes when nothing happens to it: results, weights, and an epoch's training time."""
    base = tmp_path_factory.mktemp("uninterrupted")
    code, output = run(args(fault_data, base / "out"), base)
    assert code == 0, output
    folder, res = results(base / "out")
    train_time = sorted(row["train/time"] for row in res["history"])[len(res["history"]) // 2]
    return res, torch.load(folder / "model.pt"), train_time


def inject(output: Output, signum: int, point: str, to_training: bool, train_time: float) -> int:
    """Wait for `point` in the run's output, then send `signum`; returns the epochs seen finished."""
    if point == "first epoch":
        output.wait_for(lambda line: "batches:" in line)
        time.sleep(0.1)
    else:
        output.wait_for(lambda line: line.startswith("epoch ") and f"/{EPOCHS}" in line)
        time.sleep(train_time + 0.05 if point == "evaluation" else 0)
    if to_training:
        os.kill(training_process(output.proc.pid), signum)
    else:
        os.killpg(output.proc.pid, signum)  # a terminal's Ctrl+C, a scheduler's SIGTERM: the whole process group
    return int(point != "first epoch")


POINTS = ("first epoch", "between epochs", "evaluation")
EXPECTED = {signal.SIGINT: "User abort", signal.SIGTERM: "Preempted", signal.SIGKILL: "Crashed",
            signal.SIGSEGV: "Crashed"}


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("signum", list(EXPECTED), ids=lambda s: signal.Signals(s).name)
def test_a_signal_ends_the_run_with_its_tag_and_loses_nothing(signum, point, fault_data, uninterrupted, tmp_path):
    expected_res, expected_model, train_time = uninterrupted
    to_training = signum in (signal.SIGKILL, signal.SIGSEGV)  # these kill the process that trains
    proc = launch(args(fault_data, tmp_path / "out"), tmp_path)
    try:
        output = Output(proc)
        finished_before = inject(output, signum, point, to_training, train_time)
        output, _ = output.finish(120)
    finally:
        proc.kill()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    folder, res = results(tmp_path / "out")
    tag = EXPECTED[signum]
    assert res["status"] == "failed" and tag in res["tags"] and "Success" not in res["tags"], res["tags"]
    history = res["history"]
    whole = [r for r in history if "test/accuracy" in r]  # epochs trained to their end and evaluated
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    assert len(whole) >= finished_before  # no finished epoch lost
    assert without_times(whole) == without_times(expected_res["history"][:len(whole)])
    [wandb_run] = find_runs(tmp_path, folder.name)
    assert wandb_run.exit_code == 1 and tag in wandb_run.tags and len(wandb_run.history) == len(history)
    assert wandb_run.preempting == (signum == signal.SIGTERM)
    if to_training:  # the reason is on screen, and where a W&B user looks: the summary (and the Logs tab)
        assert f"killed by {signal.Signals(signum).name}" in output
        assert f"killed by {signal.Signals(signum).name}" in wandb_run.summary["end"]
    if signum != signal.SIGTERM:
        return

    # Preempted: the epoch under way was dropped; resuming continues the same run to the very same end.
    assert all("test/accuracy" in r for r in history) and (folder / "checkpoint.pt").exists() == bool(history)
    code, output = run(args(fault_data, tmp_path / "out", "--resume", "yes"), tmp_path)
    assert code == 0 and "Resuming the run in" in output, output
    resumed_folder, res = results(tmp_path / "out")
    assert resumed_folder == folder and res["status"] == "finished" and res["tags"] == expected_res["tags"]
    assert without_times(res["history"]) == without_times(expected_res["history"])
    model = torch.load(folder / "model.pt")
    assert all(torch.equal(model[k], expected_model[k]) for k in expected_model)
    assert not (folder / "checkpoint.pt").exists()
    first, second = find_runs(tmp_path, folder.name)  # one W&B run (one id), written in two sittings offline
    assert len(first.history) + len(second.history) == EPOCHS and second.exit_code == 0
    assert second.tags == res["tags"]


def preempted_after_an_epoch(argv: list[str], wandb_dir: Path) -> None:
    """Run main.py until an epoch has ended, then preempt it: a resumable run with a checkpoint."""
    proc = launch(argv, wandb_dir)
    try:
        output = Output(proc)
        inject(output, signal.SIGTERM, "between epochs", False, 0)
        output.finish(120)
    finally:
        proc.kill()


def test_a_nan_in_the_weights_mid_run_is_caught_before_any_step(fault_data, tmp_path):
    preempted_after_an_epoch(args(fault_data, tmp_path / "out"), tmp_path)
    folder, before = results(tmp_path / "out")
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    state["model"]["0.weight"][0, 0] = float("nan")  # the fault: a NaN in the weights, mid-run
    torch.save(state, folder / "checkpoint.pt")
    code, output = run(args(fault_data, tmp_path / "out", "--resume", "yes"), tmp_path)
    assert code == 1 and "Traceback" not in output
    _, res = results(tmp_path / "out")
    assert res["status"] == "failed" and "NaN loss" in res["tags"]
    assert without_times(res["history"][:len(before["history"])]) == without_times(before["history"])
    assert res["history"][-1]["train/batches"] == 1  # stopped at the first batch, before its step


class Payload:
    """What a pickled checkpoint can carry: code that runs as it loads (here, it leaves a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_is_not_plain_data_damaged_or_another_models_is_refused_and_nothing_is_lost(tiny_data, tmp_path):
    argv = small_run(tiny_data, tmp_path / "out", "--epochs", str(EPOCHS), "--verbose", "1")
    preempted_after_an_epoch(argv, tmp_path)
    folder, before = results(tmp_path / "out")
    checkpoint, marker = folder / "checkpoint.pt", tmp_path / "the-payload-ran"
    good = checkpoint.read_bytes()
    state = torch.load(checkpoint)
    torch.save({**state, "model": {**state["model"], "0.weight": torch.zeros(3, 784)}}, checkpoint)
    other_model = checkpoint.read_bytes()
    torch.save({**state, "history": Payload(marker)}, checkpoint)
    cases = [  # (the checkpoint's bytes, what the message must say)
        (checkpoint.read_bytes(), "holds more than tensors and plain values (it calls posix.system)"),
        (other_model, "could not be loaded (Error(s) in loading state_dict"),  # another --hidden's weights
        (good[:len(good) // 2], "could not be loaded"),  # truncated, as by a full disk or a killed copy
        (b"", "could not be loaded"),
    ]
    for content, message in cases:
        checkpoint.write_bytes(content)
        code, output = run([*argv, "--resume", "yes"], tmp_path)
        assert code == 1 and f"Error: the checkpoint {checkpoint}" in output and message in output, output
        assert "Traceback" not in output and "--resume yes" not in output
        assert not marker.exists() and results(tmp_path / "out") == (folder, before)  # nothing ran, nothing lost


def test_wandb_unreachable_online_logs_offline_and_loses_nothing(tmp_path):
    data = make_dataset(tmp_path / "data")
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "5"}
    code, output = run(["--data_path", str(data), "--val_size", "100", "--batch_size", "32", "--hidden", "64",
                        "--epochs", "2", "--device", "cpu", "--save", "yes", "--output_path", str(tmp_path / "out"),
                        "--wandb_project", "boilerplate-tests", "--verbose", "1"], tmp_path, env)
    assert code == 0 and "W&B is unreachable" in output and "logging offline" in output, output
    folder, res = results(tmp_path / "out")
    assert res["status"] == "finished" and len(res["history"]) == 2
    [offline] = find_runs(tmp_path, folder.name, prefix="offline-run")
    assert offline.exit_code == 0 and len(offline.history) == 2 and offline.tags == ["Success"]


def test_bad_data_or_output_path_is_a_clear_error_before_training(tmp_path):
    data = make_dataset(tmp_path / "data")
    broken = shutil.copytree(data, tmp_path / "broken")
    images = broken / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated, as by an interrupted copy
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    small = ["--val_size", "100", "--hidden", "64", "--device", "cpu", "--save", "yes"]
    cases = [  # (data, output path, exit status, what the message must say)
        (broken, tmp_path / "out1", 1, "could not be read"),
        (data, blocker / "out", 1, "--output_path"),
        (data, tmp_path / "out3", 2, "argument --val_size"),
    ]
    for folder, out, status, message in cases:
        extra = ["--val_size", "600"] if status == 2 else []
        code, output = run(["--data_path", str(folder), *small, "--output_path", str(out), *extra], tmp_path)
        assert code == status and message in output and "Traceback" not in output, output
        assert "epoch 1/" not in output and not (out.exists() and list(out.rglob("*")))  # not even a folder


def test_a_training_process_stuck_past_the_epoch_timeout_is_killed(fault_data, tmp_path):
    # SIGSTOP: the training process stops dead, as if stuck inside one native call; the loop's own
    # check between batches never runs.
    proc = launch(args(fault_data, tmp_path / "out", "--epoch_timeout", "0.1"), tmp_path)
    try:
        output = Output(proc)
        finished_before = inject(output, signal.SIGSTOP, "between epochs", True, 0)
        output, _ = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in output, output
    assert "stuck" in output and "--epoch_timeout 0.1 min" in output
    folder, res = results(tmp_path / "out")
    assert res["status"] == "failed" and "Timeout" in res["tags"] and len(res["history"]) >= finished_before
    [wandb_run] = find_runs(tmp_path, folder.name)
    assert wandb_run.exit_code == 1 and "Timeout" in wandb_run.tags and len(wandb_run.history) == len(res["history"])


def test_a_preempted_sweep_run_resumes_by_itself_when_wandb_requeues_it(fault_data, uninterrupted, tmp_path):
    # W&B's agent starts a re-queued run again with its own run id (WANDB_RUN_ID) and no new flag.
    expected_res, expected_model, _ = uninterrupted
    agent = {"WANDB_SWEEP_ID": "sweep123", "WANDB_RUN_ID": "preempted1", "WANDB_PROJECT": "boilerplate-tests"}
    argv = [a for a in args(fault_data, tmp_path / "out") if a not in ("--wandb_project", "boilerplate-tests")]
    proc = launch(argv, tmp_path, agent)
    try:
        output = Output(proc)
        inject(output, signal.SIGTERM, "between epochs", False, 0)
        output.finish(120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Preempted" in results(tmp_path / "out")[1]["tags"]
    code, output = run(argv, tmp_path, agent)
    assert code == 0 and "Resuming the run in" in output, output
    folder, res = results(tmp_path / "out")
    assert folder.name == "preempted1" and without_times(res["history"]) == without_times(expected_res["history"])
    first, second = find_runs(tmp_path, "preempted1")
    assert first.preempting and first.sweep_id == second.sweep_id == "sweep123" and second.exit_code == 0
