"""main.py end to end, in this process: real training through torchvision's MNIST loader on tiny
IDX files, real W&B in offline mode read back from its run file. Every tag provoked for real."""

import http.server
import io
import json
import math
import os
import random
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb

import demo
import main
import utils
from boilerplate import checkpoints, devices, distributed, metrics, options, runs, schedules, session, steps, watch
from boilerplate.batches import DeviceBatches, batches_of
from conftest import (
    OFFLINE,
    a_disabled_run,
    epoch_rows,
    experiment,
    in_memory,
    one_epoch,
    parse,
    results,
    small_run,
    start_main,
    wandb_epochs,
    whole_epochs,
    without_times,
)
from wandb_file import find_run, find_runs, read_run
from wandb_server import WandbServer


def run_main(*args: str) -> int:
    # In this process, as under a debugger: the output is the test's to read. The watched training
    # process (--watchdog yes, the default) is tested on real processes in test_process and test_faults.
    return main.main([*args, "--watchdog", "no"])


class Preempted:
    """main.train_epoch, wrapped: a SIGTERM to this process as its Nth call (a run's epoch N) begins, for each
    N given to `start` (none before), as a scheduler preempts a job; the count begins again at each start."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls, self.at, train_epoch = 0, (), main.train_epoch

        def preempted(*args):
            self.calls += 1
            if self.calls in self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            return train_epoch(*args)

        monkeypatch.setattr(main, "train_epoch", preempted)

    def start(self, *at: int) -> None:
        self.calls, self.at = 0, at


def test_a_run_folder_is_shared_as_the_umask_asks(tiny_data, tmp_path):
    """On a lab's shared storage the umask lets the group read (and here write) what a run saves: every
    file of the run folder follows it, as open() would, not mkstemp's owner-only 0600."""
    previous = os.umask(0o002)
    try:
        assert run_main(*small_run(tiny_data, tmp_path / "out")) == 0
    finally:
        os.umask(previous)
    folder, _ = results(tmp_path / "out")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes == dict.fromkeys(("config.json", "results.json", "model.pt", "best.pt"), 0o664), modes


def wandb_run(wandb_dir: Path, run_id: str):
    """The run as W&B wrote it. W&B's service writes the file behind the process's back; at exit
    Python waits for it, here this test does, as the process would."""
    wandb.teardown()
    return find_run(wandb_dir, run_id)


@pytest.mark.every_python
def test_success_with_wandb_and_save(tiny_data, wandb_dir, tmp_path):
    out = tmp_path / "out"
    assert run_main(*small_run(tiny_data, out, "--wandb_project", "boilerplate-tests", "--seed", "3")) == 0
    folder, res = results(out)
    config = json.loads((folder / "config.json").read_text())

    assert res["status"] == "finished" and res["tags"] == ["Success"]
    assert res["seed"] == config["seed"] == 3 and res["group"] == config["group"] == folder.parent.name
    assert config["device"] == "cpu" and config["lr"] == 1e-3 and config["batch_size"] == 32
    assert len(res["history"]) == 2 and res["history"][-1]["test/accuracy"] > 0.9
    for key in (
        "train/loss",
        "train/accuracy",
        "train/f1",
        "val/accuracy",
        "val/f1",
        "test/accuracy",
        "test/f1",
        "train/grad_norm_mean",
        "train/grad_norm_std",
        "train/time",
        "val/time",
        "test/time",
        "gap/accuracy",
        "gap/f1",
    ):
        assert key in res["history"][0], key
    # What does not change, once: the guessing baselines, the split sizes, the parameter count
    constants = res["constants"]
    assert constants["test/random_accuracy"] == pytest.approx(1 / demo.CLASSES) and "val/most_probable_f1" in constants
    assert (constants["data/train_size"], constants["data/val_size"], constants["data/test_size"]) == (500, 100, 200)
    state = torch.load(folder / "model.pt")
    assert constants["model/parameters"] == sum(t.numel() for t in state.values())
    assert not any(key in row for row in res["history"] for key in constants)

    run = wandb_run(wandb_dir, folder.name)
    assert res["wandb_run_path"].endswith(folder.name)
    assert run.group == res["group"] and run.tags == ["Success"] and run.exit_code == 0
    assert run.config["seed"] == 3 and run.config["lr"] == 1e-3 and run.config["group"] == res["group"]
    epochs = epoch_rows(run.history)  # a fork's own wandb.log rows aside
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert all(row["evaluated"] for row in res["history"]) and not any("evaluated" in row for row in epochs)
    assert all(run.config[key] == value for key, value in constants.items())  # in the config, not the history
    assert not any(key in row for row in run.history for key in constants)
    assert epochs[1]["test/accuracy"] == pytest.approx(res["history"][1]["test/accuracy"])
    assert run.summary["seed"] == 3
    accuracies = [row["val/accuracy"] for row in res["history"]]  # the best epoch's and the last
    assert run.summary["val/accuracy"] == {"max": pytest.approx(max(accuracies)), "last": pytest.approx(accuracies[-1])}
    assert run.summary["best/val/accuracy"] == pytest.approx(max(accuracies))


def test_the_best_epoch_is_chosen_on_validation_and_reports_the_test_score_there(tiny_data, wandb_dir, tmp_path):
    """Model selection on the validation split: results.json and W&B's summary hold the best epoch by
    --monitor, with the test metrics at that epoch; W&B's test entries are the last, never a maximum; best.pt
    holds that epoch's weights, which score its test accuracy again."""
    argv = small_run(tiny_data, tmp_path, "--epochs", "4", "--monitor", "val/loss")
    argv += ["--wandb_project", "boilerplate-tests"]
    assert run_main(*argv) == 0
    folder, res = results(tmp_path)
    history = res["history"]
    chosen = min(history, key=lambda row: row["val/loss"])
    assert res["best"] == {"best/epoch": chosen["epoch"]} | {
        key: chosen[key.removeprefix("best/")] for key in res["best"] if key != "best/epoch"
    }
    assert {"best/val/loss", "best/val/accuracy", "best/test/accuracy", "best/test/loss"} <= set(res["best"])
    run = wandb_run(wandb_dir, folder.name)
    assert run.summary["best/epoch"] == chosen["epoch"]
    assert run.summary["best/test/accuracy"] == pytest.approx(chosen["test/accuracy"])
    assert run.summary["test/accuracy"] == {"last": pytest.approx(history[-1]["test/accuracy"])}
    assert run.summary["val/loss"]["min"] == pytest.approx(chosen["val/loss"])

    args = parse(*argv)
    description = main.load_data(args)
    model = main.build_model(args, description)
    model.load_state_dict(torch.load(folder / "best.pt", weights_only=True))
    test = batches_of(description.splits["test"], torch.device("cpu"), workers=0)  # as the run does: any Dataset
    with a_disabled_run():  # the training code called straight, as in a run: a fork's wandb.log works
        predictions, labels, _ = main.evaluate(model, test, "test", args)
    scored = metrics.metric_values(predictions, labels, "test", demo.CLASSES)
    assert scored["test/accuracy"] == pytest.approx(chosen["test/accuracy"])


@pytest.mark.parametrize("stop_at", [None, 2], ids=["never-stopped", "preempted-after-epoch-2"])
def test_patience_stops_a_run_that_no_longer_improves_and_survives_a_resume(stop_at, noise_data, tmp_path, monkeypatch):
    """Nothing to learn (shuffled labels): the validation loss stops improving, and --patience 2 ends the run
    there, Early stopped, Finished; a run preempted on the way and resumed ends the same (the best epoch and
    the count since come from the history its checkpoint keeps)."""
    preempt = Preempted(monkeypatch)
    flags = ("--epochs", "30", "--monitor", "val/loss", "--patience", "2")
    whole = small_run(noise_data, tmp_path / "whole", *flags)
    assert run_main(*whole) == 0
    res = results(tmp_path / "whole")[1]
    history = res["history"]
    assert res["tags"][0] == "Early stopped" and "Success" not in res["tags"] and res["status"] == "finished"
    assert len(history) < 30 and history[-1]["epoch"] - res["best"]["best/epoch"] == 2
    if stop_at:
        preempt.start(stop_at)
        stopped = small_run(noise_data, tmp_path / "stopped", *flags)
        assert run_main(*stopped) == 1 and "Preempted" in results(tmp_path / "stopped")[1]["tags"]
        assert run_main(*stopped, "--resume", "yes") == 0
        resumed = results(tmp_path / "stopped")[1]
        assert without_times(resumed["history"]) == without_times(history) and resumed["tags"] == res["tags"]
        assert resumed["best"] == res["best"]


def test_resume_yes_continues_the_stopped_run_where_this_sitting_keeps_nothing(tiny_data, tmp_path, monkeypatch, capfd):
    """--resume yes with --save no --checkpoint_every 0 (a sitting that keeps nothing of its own) still continues
    the stopped run an earlier sitting left, and a second stop keeps that run's checkpoint to go on from. Before,
    it did not look: it trained a new run from scratch without a word, and the stopped one was left behind."""
    preempt = Preempted(monkeypatch)
    verbose = ("--epochs", "3", "--verbose", "1")
    assert run_main(*small_run(tiny_data, tmp_path / "whole", *verbose)) == 0
    last = [line for line in capfd.readouterr().out.splitlines() if line.startswith("epoch 3/3")]
    argv = small_run(tiny_data, tmp_path / "out", *verbose, "--save", "no")
    preempt.start(3)  # stopped in epoch 3: the checkpoint holds epochs 1 and 2
    assert run_main(*argv) == 1
    folder, _ = results(tmp_path / "out")
    nothing_kept = (*argv, "--checkpoint_every", "0", "--resume", "yes")
    preempt.start(1)  # stopped again at once: epoch 3 is this sitting's first
    capfd.readouterr()
    assert run_main(*nothing_kept) == 1
    assert f"Resuming the run in {folder}" in capfd.readouterr().err
    assert (folder / "checkpoint.pt").exists() and json.loads((folder / "results.json").read_text())["tags"] == [
        "Preempted"
    ]
    preempt.start()
    assert run_main(*nothing_kept) == 0
    out = capfd.readouterr().out
    assert [line.rsplit("(", 1)[0] for line in out.splitlines() if line.startswith("epoch")] == [
        line.rsplit("(", 1)[0] for line in last
    ]  # epoch 3 alone, as the run never stopped trained it
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))  # finished, --save no


def test_a_torchrun_jobs_new_start_continues_the_run_it_stopped_and_no_other(tiny_data, tmp_path, monkeypatch, capfd):
    """torchrun starts a job's processes again when a machine joins it (its restart count still 0): the job
    continues the run it stopped, found by the job's id (TORCHELASTIC_RUN_ID, kept in results.json), and says
    so. Another job (a new launch: a new id) leaves that run alone and starts its own, saying nothing."""
    preempt = Preempted(monkeypatch)
    argv = small_run(tiny_data, tmp_path, "--epochs", "3")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    preempt.start(2)
    assert run_main(*argv) == 1
    stopped, res = results(tmp_path)
    assert res["tags"] == ["Preempted"] and res["job"] == "job-a"
    preempt.start()
    capfd.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert run_main(*argv) == 0
    assert "stopped run" not in capfd.readouterr().err
    [other] = [folder for folder in tmp_path.glob("*/*/") if folder != stopped]
    assert json.loads((stopped / "results.json").read_text())["tags"] == ["Preempted"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    assert run_main(*argv) == 0
    assert "torchrun started job job-a again" in capfd.readouterr().err
    res = json.loads((stopped / "results.json").read_text())
    assert res["tags"] == ["Success"] and [row["epoch"] for row in res["history"] if row["evaluated"]] == [1, 2, 3]
    assert len(list(tmp_path.glob("*/*/"))) == 2


@pytest.mark.parametrize("when", ["best", "end"])
def test_the_model_is_logged_as_a_wandb_artifact_and_read_back_from_the_run_file(when, tiny_data, wandb_dir, tmp_path):
    argv = small_run(tiny_data, tmp_path, "--epochs", "3", "--log_model", when, "--wandb_project", "boilerplate-tests")
    assert run_main(*argv) == 0
    folder, res = results(tmp_path)
    artifacts = [
        a for a in wandb_run(wandb_dir, folder.name).artifacts if a["type"] == "model"
    ]  # a fork's tables aside
    assert artifacts and all(a["name"] == f"model-{folder.name}" and a["type"] == "model" for a in artifacts)
    assert all(a["metadata"]["config"]["group"] == res["group"] and a["files"]["model.pt"] > 0 for a in artifacts)
    if when == "best":  # one a better epoch, the last the best
        improved = [
            row["epoch"]
            for row in res["history"]
            if row["val/accuracy"]
            > max([r["val/accuracy"] for r in res["history"] if r["epoch"] < row["epoch"]], default=-1.0)
        ]
        assert [a["metadata"]["epoch"] for a in artifacts] == improved
        assert sorted(artifacts[-1]["aliases"]) == ["best", "latest"] and improved[-1] == res["best"]["best/epoch"]
    else:
        assert [(a["metadata"]["epoch"], a["aliases"]) for a in artifacts] == [(3, ["latest"])]


def test_a_model_asked_of_wandb_where_none_will_be_logged_is_said_as_the_run_starts(
    tiny_data, wandb_dir, tmp_path, capfd, monkeypatch
):
    """--log_model without a W&B run, or best with --monitor none (never a better epoch), logs no model: the
    run trains, and says so as it starts, instead of leaving a researcher to look for the artifact."""
    quick = ("--epochs", "1", "--save", "no")
    with monkeypatch.context() as without_wandb:
        without_wandb.setenv("WANDB_MODE", "disabled")
        assert run_main(*small_run(tiny_data, tmp_path, *quick, "--log_model", "end")) == 0
        assert run_main(*small_run(tiny_data, tmp_path, *quick, "--log_model", "best", "--wandb_project", "p")) == 0
    err = capfd.readouterr().err
    assert "Warning: --log_model end logs the model to W&B, and this run logs to no W&B run (no --wandb_project" in err
    assert "no W&B run (WANDB_MODE=disabled): no model will be logged (with --save yes, best.pt" in err
    argv = small_run(tiny_data, tmp_path, *quick, "--log_model", "best", "--wandb_project", "boilerplate-tests")
    assert run_main(*argv, "--monitor", "none", "--seed", "1") == 0
    assert run_main(*argv, "--seed", "2") == 0  # logs one: no warning
    err = capfd.readouterr().err
    assert err.count("Warning: --log_model") == 1
    assert "Warning: --log_model best logs the model at each better --monitor, and --monitor none" in err
    wandb.teardown()  # W&B's service writes the files behind the process's back
    runs_ = [read_run(path) for path in wandb_dir.glob("wandb/offline-run-*/run-*.wandb")]
    assert sorted((r.config["seed"], any(a["type"] == "model" for a in r.artifacts)) for r in runs_) == [
        (1, False),
        (2, True),
    ]


@pytest.mark.parametrize("when", ["best", "end"])
def test_the_models_logged_across_a_resume_are_those_of_a_run_never_stopped(
    when, tiny_data, wandb_dir, tmp_path, monkeypatch
):
    """--log_model and a preemption: the stopped sitting and the resumed one log, between them, the models a
    run never stopped logs (the same epochs, aliases and artifact name), none twice and none lost."""
    preempt = Preempted(monkeypatch)

    def models(run_id: str) -> list[tuple]:
        wandb.teardown()  # W&B's service writes the files behind the process's back
        sittings = find_runs(wandb_dir, run_id)
        return [
            (a["name"], a["metadata"]["epoch"], sorted(a["aliases"]))
            for run in sittings
            for a in run.artifacts
            if a["type"] == "model"
        ]

    flags = ("--epochs", "4", "--log_model", when, "--monitor", "val/loss", "--wandb_project", "boilerplate-tests")
    assert run_main(*small_run(tiny_data, tmp_path / "whole", *flags)) == 0
    preempt.start(3)  # stopped in epoch 3: epochs 1 and 2 done, their models (if best) logged
    assert run_main(*small_run(tiny_data, tmp_path / "stopped", *flags)) == 1
    assert run_main(*small_run(tiny_data, tmp_path / "stopped", *flags, "--resume", "yes")) == 0
    (whole_folder, whole), (folder, resumed) = (results(tmp_path / name) for name in ("whole", "stopped"))
    assert without_times(resumed["history"]) == without_times(whole["history"]) and resumed["best"] == whole["best"]
    expected = [(f"model-{folder.name}", *model[1:]) for model in models(whole_folder.name)]
    assert expected and models(folder.name) == expected
    assert len(find_runs(wandb_dir, folder.name)) == 2  # two sittings, one W&B run


def test_the_best_model_reaches_wandbs_server_as_a_committed_artifact(tiny_data, tmp_path, monkeypatch):
    """Online, against a stand-in of W&B's server that W&B's client takes through its own steps: the model
    artifact is created, uploaded and committed, and what was uploaded is best.pt's weights."""
    stand_in = WandbServer()
    try:
        for name, value in {**stand_in.environment(), "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
            monkeypatch.setenv(name, value)
        argv = small_run(tiny_data, tmp_path / "out", "--epochs", "2", "--log_model", "best", "--monitor", "val/loss")
        assert run_main(*argv, "--wandb_project", "boilerplate-tests") == 0
        wandb.teardown()  # the uploads end as the process would end
        folder, res = results(tmp_path / "out")
        models = [a for a in stand_in.artifacts.values() if a["type"] == "model"]
    finally:
        stand_in.close()
    assert [a["metadata"]["epoch"] for a in models] == [1, 2] and res["best"]["best/epoch"] == 2
    assert all(a["name"] == f"model-{folder.name}" and a["state"] == "COMMITTED" for a in models)
    uploaded = torch.load(io.BytesIO(models[-1]["uploads"]["model.pt"]), weights_only=True)
    best = torch.load(folder / "best.pt", weights_only=True)
    assert uploaded.keys() == best.keys() and all(torch.equal(uploaded[k], best[k]) for k in best)


def test_a_resume_logs_once_the_epoch_wandbs_server_had_before_results_json(tiny_data, tmp_path, monkeypatch):
    """Each epoch is logged to W&B, then saved to results.json: a training process killed between the two (or
    a full disk at the save) leaves W&B's server one whole epoch ahead of results.json and the checkpoint.
    --resume yes trains that epoch again and logs it once: W&B's history holds each epoch once."""
    out, calls, saved, train_epoch = tmp_path / "out", [], [], main.train_epoch

    def killed_in_epoch_3s_window(*args):
        calls.append(1)
        if len(calls) == 3:  # results.json as epoch 2's save left it, the checkpoint of epoch 2 beside it
            saved.append(next(out.glob("*/*/results.json")).read_text())
        if len(calls) == 4:  # epoch 3 is logged to W&B and saved; its save is undone below
            os.kill(os.getpid(), signal.SIGTERM)
        return train_epoch(*args)

    stand_in = WandbServer()
    try:
        for name, value in {**stand_in.environment(), "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
            monkeypatch.setenv(name, value)
        flags = ("--epochs", "4", "--checkpoint_every", "2", "--wandb_project", "boilerplate-tests")
        monkeypatch.setattr(main, "train_epoch", killed_in_epoch_3s_window)
        assert run_main(*small_run(tiny_data, out, *flags)) == 1
        folder, _ = results(out)
        (folder / "results.json").write_text(saved[0])  # what the kill between epoch 3's row and its save leaves
        monkeypatch.setattr(main, "train_epoch", train_epoch)
        assert run_main(*small_run(tiny_data, out, *flags, "--resume", "yes")) == 0
        wandb.teardown()  # the uploads end as the process would end
        run = stand_in.runs[folder.name]
    finally:
        stand_in.close()
    resumed = results(out)[1]
    assert whole_epochs(json.loads(saved[0])["history"]) == [1, 2] and whole_epochs(resumed["history"]) == [1, 2, 3, 4]
    assert wandb_epochs(run.history) == [1, 2, 3, 4] and run.exit_code == 0


def test_init_from_starts_from_saved_weights_and_refuses_weights_that_do_not_fit(tiny_data, tmp_path, capsys):
    assert run_main(*small_run(tiny_data, tmp_path / "first", "--epochs", "1")) == 0
    folder, first = results(tmp_path / "first")
    args = parse(*small_run(tiny_data, tmp_path))
    description = main.load_data(args)
    saved = torch.load(folder / "model.pt", weights_only=True)
    for source in (folder / "model.pt", folder / "best.pt"):  # one epoch: its best is its last
        model = main.build_model(args, description)
        checkpoints.load_weights(model, source, torch.device("cpu"))
        assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)

    artifact = tmp_path / "artifacts" / "model-run:v0"  # as W&B's artifact.download() leaves it: a folder
    artifact.mkdir(parents=True)
    shutil.copy(folder / "model.pt", artifact)
    argv = small_run(tiny_data, tmp_path / "second", "--epochs", "1", "--init_from", str(artifact))
    assert run_main(*argv) == 0
    second = results(tmp_path / "second")[1]  # it begins where the first ended: a better first epoch
    assert second["history"][0]["train/accuracy"] > first["history"][0]["train/accuracy"]

    wrong = {name: torch.zeros(3, *tensor.shape[1:]) for name, tensor in saved.items()}  # another model's
    torch.save(wrong, tmp_path / "wrong.pt")
    (tmp_path / "garbage.pt").write_text("not torch's")
    (tmp_path / "empty").mkdir()
    shutil.copytree(folder, tmp_path / "run")  # a run folder: best.pt and model.pt
    bad = {
        "wrong.pt": "does not fit the model",
        "garbage.pt": "could not be loaded",
        "missing.pt": "could not be loaded",
        "run": "is a folder: name one of its files: best.pt, model.pt.",
        "empty": "is a folder: it holds no .pt file.",
    }
    for name, said in bad.items():
        assert run_main(*small_run(tiny_data, tmp_path / "bad", "--init_from", str(tmp_path / name))) == 1
        err = capsys.readouterr().err
        assert f"Error: --init_from {tmp_path / name} {said}" in err and "Traceback" not in err, err
        assert not list((tmp_path / "bad").rglob("*.json"))  # nothing left


def test_a_run_from_saved_weights_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """--init_from and a preemption: the resumed run goes on from its checkpoint (not from the saved weights
    again) and equals a run never stopped."""
    assert run_main(*small_run(tiny_data, tmp_path / "first", "--epochs", "1")) == 0
    weights = str(results(tmp_path / "first")[0] / "model.pt")
    assert_resumed_exactly(tiny_data, tmp_path, monkeypatch, "--init_from", weights)


def assert_resumed_exactly(data: Path, tmp_path: Path, monkeypatch, *flags: str) -> None:
    """A 3-epoch run preempted as epoch 2 begins and resumed (--resume yes) equals a run never stopped."""
    preempt, flags = Preempted(monkeypatch), ("--epochs", "3", *flags)
    assert run_main(*small_run(data, tmp_path / "whole", *flags)) == 0
    preempt.start(2)
    assert run_main(*small_run(data, tmp_path / "stopped", *flags)) == 1
    assert run_main(*small_run(data, tmp_path / "stopped", *flags, "--resume", "yes")) == 0
    whole, resumed = (results(tmp_path / name)[1]["history"] for name in ("whole", "stopped"))
    assert len(whole) == 3 and without_times(resumed) == without_times(whole)


@pytest.mark.every_python  # torch.compile reads each Python's own bytecode
def test_compile_yes_resumes_exactly_and_saves_weights_the_model_uncompiled_loads(tiny_data, tmp_path, monkeypatch):
    """--compile yes: a run preempted as epoch 2 begins and resumed equals a run never stopped (with torch's
    automatic dynamic shapes it did not: other kernels after an epoch's shorter last batch, so the resumed
    epoch rounded otherwise), and its model.pt loads into the model uncompiled (torch.compile(model) would
    have renamed every weight)."""
    assert_resumed_exactly(tiny_data, tmp_path, monkeypatch, "--compile", "yes", "--batch_size", "128")
    args = parse(*small_run(tiny_data, tmp_path))
    model = main.build_model(args, main.load_data(args))
    model.load_state_dict(torch.load(results(tmp_path / "whole")[0] / "model.pt", weights_only=True))


def test_a_model_torch_cannot_compile_is_a_clear_error_before_training(tiny_data, tmp_path):
    """--compile yes where torch.compile fails (here its C++ compiler cannot be run): exit 1 before any epoch,
    torch's error in one line, naming --compile, no traceback, nothing left."""
    env = {"CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # nothing cached
    proc = start_main(small_run(tiny_data, tmp_path / "out", "--compile", "yes"), env={**OFFLINE, **env})
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "InductorError" in err and "--compile no tells if it is at fault; nothing was trained" in err, err
    assert not list((tmp_path / "out").rglob("*"))


def test_wandb_project_from_the_environment_and_the_users_own_tags(tiny_data, wandb_dir, tmp_path, monkeypatch):
    # As for any W&B script: WANDB_PROJECT turns logging on, and the tags in WANDB_TAGS stay.
    monkeypatch.setenv("WANDB_PROJECT", "boilerplate-tests")
    monkeypatch.setenv("WANDB_TAGS", "mine,baseline")
    assert run_main(*small_run(tiny_data, tmp_path, "--vanishing_threshold", "1000")) == 0
    folder, res = results(tmp_path)
    run = wandb_run(wandb_dir, folder.name)
    assert res["tags"] == ["Success", "Vanishing gradient"]
    assert run.tags == ["mine", "baseline", "Success", "Vanishing gradient"]
    assert ["mine", "baseline", "Vanishing gradient"] in run.tag_updates  # set as it was raised, mid-run


def test_same_seed_gives_the_same_history(tiny_data, tmp_path):
    histories = []
    for name in ("a", "b"):
        assert run_main(*small_run(tiny_data, tmp_path / name, "--seed", "11")) == 0
        histories.append(without_times(results(tmp_path / name)[1]["history"]))
    assert histories[0] == histories[1]
    assert run_main(*small_run(tiny_data, tmp_path / "c", "--seed", "12")) == 0
    assert results(tmp_path / "c")[1]["history"][0]["train/loss"] != histories[0][0]["train/loss"]


def test_random_seed_is_recorded_and_keeps_the_group(tiny_data, tmp_path):
    assert run_main(*small_run(tiny_data, tmp_path / "a", "--seed", "random")) == 0
    assert run_main(*small_run(tiny_data, tmp_path / "b", "--seed", "5")) == 0
    (folder, res), (_, fixed) = results(tmp_path / "a"), results(tmp_path / "b")
    config = json.loads((folder / "config.json").read_text())
    assert res["seed"] == config["seed"] >= 0 and res["group"] == fixed["group"]


def test_gradient_thresholds_crossed_by_real_norms(tiny_data, tmp_path):
    code = run_main(
        *small_run(
            tiny_data,
            tmp_path,
            "--vanishing_threshold",
            "1000",
            "--exploding_threshold",
            "0.001",
            "--std_threshold",
            "0",
        )
    )
    tags = results(tmp_path)[1]["tags"]
    assert code == 0 and {"Success", "Vanishing gradient", "Exploding gradient", "High StdDev"} <= set(tags)


def test_overfitting_when_the_test_set_cannot_be_learnt(overfit_data, tmp_path):
    code = run_main(*small_run(overfit_data, tmp_path, "--epochs", "4"))
    _, res = results(tmp_path)
    assert code == 0 and res["history"][-1]["gap/accuracy"] > 0.5
    assert {"Success", "Overfitting accuracy (learning)", "Overfitting accuracy (end)"} <= set(res["tags"])


@pytest.mark.usefixtures("in_a_run")  # train_epoch called straight: as in main.py
def test_between_host_looks_the_fused_optimizer_skips_non_finite_steps(tiny_data, tmp_path):
    # What an accelerator does (main.py looks at the flag every SYNC_EVERY batches there), on the CPU.
    torch.manual_seed(0)
    args = parse(*small_run(tiny_data, tmp_path, "--batch_size", "8"))
    description = main.load_data(args)
    data = DeviceBatches(in_memory(description.splits["train"]), torch.device("cpu"))
    for optimizer_class in (torch.optim.SGD, torch.optim.Adam):
        model = main.build_model(args, description)
        optimizer = optimizer_class(model.parameters(), lr=1e30, fused=True)
        stats, tag = one_epoch(model, optimizer, data, args, sync_every=devices.SYNC_EVERY)
        assert tag in ("NaN loss", "Inf loss", "NaN gradient") and stats["train/batches"] < devices.SYNC_EVERY
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_between_host_looks_a_non_finite_step_is_skipped_whatever_the_default_dtype():
    """A fork working in float64 (torch.set_default_dtype): the flag the fused optimizer reads is still
    float32, which GradScaler's check (Steps.flag) requires, and the NaN steps between looks are skipped."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
        data = DeviceBatches(torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)), "cpu")
        before = [p.detach().clone() for p in model.parameters()]
        bookkeeping = steps.Steps(data, 4, torch.Generator(), model, optimizer, watch.Link(), sync_every=50)
        for x, y in bookkeeping:
            logits = model(x) * math.nan
            loss = torch.nn.functional.cross_entropy(logits, y)
            bookkeeping.scaled(loss).backward()
            assert bookkeeping.keep(loss, logits, y)  # no look yet: the host has not read the flag
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert bookkeeping.nonfinite.item() == 1.0 and bookkeeping.end()[1] == "NaN loss"
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    finally:
        torch.set_default_dtype(default)


class NaNAt(DeviceBatches):
    """The same batches, but batch `k` is NaN: a fork's data gone bad mid-epoch."""

    def __init__(self, data: DeviceBatches, k: int | None):
        self.x, self.y, self.k = data.x, data.y, k

    def batches(self, size, generator=None):
        for i, (x, y) in enumerate(super().batches(size, generator)):
            yield (x * math.nan if i == self.k else x), y


def by_hand(model, data, args, generator) -> tuple[list[float], list[float], float]:
    """Each batch's loss and gradient norm, and the accuracy over them, up to the first NaN loss."""
    losses, norms, right, seen = [], [], 0, 0
    for x, y in data.batches(args.batch_size, generator):
        model.zero_grad(set_to_none=True)
        with devices.autocast(args.precision, x.device):
            logits = model(x)
            loss = main.loss_of(logits, y, args)  # the fork's own loss and predictions, through the seams
        loss.backward()
        losses.append(loss.item())
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        right, seen = right + (main.predictions_of(logits) == y).sum().item(), seen + len(y)
        if math.isnan(losses[-1]):
            break
    return losses, norms, right / seen


@pytest.mark.usefixtures("in_a_run")  # train_epoch called straight: as in main.py
@pytest.mark.parametrize("sync_every", [1, devices.SYNC_EVERY], ids=["cpu-every-batch", "accelerator-every-50"])
@pytest.mark.parametrize("precision", options.PRECISIONS)
@pytest.mark.parametrize("nan_at", [None, 40], ids=["whole-epoch", "nan-batch-40"])
def test_an_epochs_statistics_are_its_batches_own(tiny_data, tmp_path, nan_at, precision, sync_every):
    """With lr 0 the model stays as it is, so each batch can be recomputed by hand in the same order: the
    epoch's loss, gradient norms and accuracy must be those of its batches (86 of them: not a multiple of
    steps.OUTPUTS_PER_ARGMAX, the last one short), and a NaN batch ends the epoch with itself, however
    late the host looks."""
    torch.manual_seed(0)
    args = parse(*small_run(tiny_data, tmp_path, "--batch_size", "7", "--precision", precision))
    description = main.load_data(args)
    data = NaNAt(DeviceBatches(in_memory(description.splits["train"]), torch.device("cpu")), nan_at)
    model = main.build_model(args, description)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)
    stats, tag = one_epoch(model, optimizer, data, args, sync_every=sync_every)
    losses, norms, accuracy = by_hand(model, data, args, torch.Generator().manual_seed(0))
    assert len(data) == 600 and len(losses) == (86 if nan_at is None else nan_at + 1)
    assert tag == (None if nan_at is None else "NaN loss") and stats["train/batches"] == len(losses)
    assert stats["train/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    if nan_at is None:
        sizes = [7] * 85 + [5]
        assert stats["train/loss"] == pytest.approx(
            sum(v * s for v, s in zip(losses, sizes, strict=True)) / 600, rel=1e-5
        )
    else:
        assert math.isnan(stats["train/loss"])
    mean, std, low, high = utils.describe(norms)
    assert (
        stats["train/grad_norm_mean"],
        stats["train/grad_norm_std"],
        stats["train/grad_norm_min"],
        stats["train/grad_norm_max"],
    ) == pytest.approx((mean, std, low, high), rel=1e-4)


@pytest.mark.usefixtures("in_a_run")  # train_epoch called straight: as in main.py
def test_a_frozen_layer_is_left_out_of_the_norms_and_stays_as_it_was(tiny_data, tmp_path):
    """Fine-tuning freezes parameters: they have no gradient, and the loop must not need one."""
    torch.manual_seed(0)
    args = parse(*small_run(tiny_data, tmp_path, "--grad_clipping", "1"))
    description = main.load_data(args)
    model = main.build_model(args, description)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = frozen.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    data = DeviceBatches(in_memory(description.splits["train"]), torch.device("cpu"))
    stats, tag = one_epoch(model, optimizer, data, args)
    assert tag is None and math.isfinite(stats["train/grad_norm_mean"]) and torch.equal(frozen, before)


@pytest.mark.usefixtures("in_a_run")  # train_epoch called straight: as in main.py
def test_gradients_accumulated_over_4_batches_of_32_step_as_one_batch_of_128(tiny_data, tmp_path):
    """SGD without dropout: the same weights after an epoch, the last, shorter group of batches (32, 32, 24
    samples, as the last batch of 128 holds 88) stepping too; the detectors see each step's gradient norm."""
    weights, stats, start = [], [], None
    for batch_size, accumulate in ((32, 4), (128, 1)):
        args = parse(*small_run(tiny_data, tmp_path, "--optimizer", "sgd", "--lr", "0.1"))
        args.batch_size, args.accumulate = batch_size, accumulate
        description = main.load_data(args)
        torch.manual_seed(0)
        model = main.build_model(args, description)
        start = start or [p.detach().clone() for p in model.parameters()]
        data = DeviceBatches(in_memory(description.splits["train"]), torch.device("cpu"))
        epoch, tag = one_epoch(model, main.build_optimizer(args, model), data, args)
        assert tag is None and len(data) == 600
        weights.append([p.detach().clone() for p in model.parameters()])
        stats.append(epoch)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*weights, strict=True))
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(weights[0], start, strict=True))  # it trained
    assert (stats[0]["train/batches"], stats[1]["train/batches"]) == (19, 5)
    for key in ("train/loss", "train/accuracy", "train/grad_norm_mean", "train/grad_norm_max"):
        assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-4), key


def test_each_schedule_from_torch_over_the_runs_steps_after_a_linear_warm_up():
    def rates(kind: str, warmup: float, steps: int = 20) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = schedules.standard(optimizer, kind, warmup, steps)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen

    assert set(options.SCHEDULES) == {"constant", "cosine", "linear", "step"}  # the choices of --lr_schedule
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert schedules.standard(optimizer, "constant", 0.0, 20) is None  # nothing to step: the default costs nothing
    assert schedules.standard(optimizer, "constant", 0.05, 20) is None  # a warm-up of one step is none
    assert rates("constant", 0.2) == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 17)
    cosine, linear, step = rates("cosine", 0.2), rates("linear", 0.2), rates("step", 0)
    assert cosine[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0]) and 0 < cosine[-1] < 0.01
    assert cosine == sorted(cosine[:4]) + sorted(cosine[4:], reverse=True)
    assert linear[4:] == pytest.approx([1 - i / 16 for i in range(16)])
    assert step == pytest.approx([1.0] * 10 + [0.1] * 5 + [0.01] * 5)


@pytest.mark.every_python
def test_bf16_trains_with_accumulated_gradients_and_a_schedule(tiny_data, tmp_path):
    flags = ("--precision", "bf16", "--accumulate", "3", "--lr_schedule", "linear", "--warmup", "0.1")
    assert run_main(*small_run(tiny_data, tmp_path, "--epochs", "3", *flags)) == 0
    res = results(tmp_path)[1]
    assert res["tags"] == ["Success"]  # no guessing tag either: it learned (how well is the demo's own business)
    rates = [row["train/lr"] for row in res["history"]]
    assert rates == sorted(rates, reverse=True) and rates[-1] == 0.0  # linear, to 0 at the run's last step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_squared_gradient_norms_on_either_path(dtype):
    """fp32 and fp64 on the CPU go through dot products, the rest through torch's fused norm; a gradient
    laid out channels-last is not contiguous, and an fp16 norm of 1000 must not overflow when squared."""
    shapes = [(64, 3, 3, 3), (64,), (10, 64)]
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
    params[0].data = params[0].data.to(memory_format=torch.channels_last)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad = torch.full((64,), 125.0, dtype=dtype)  # norm 1000
    squared = [float(s) for s in steps.squared_gradient_norms(params)()]
    assert not params[0].grad.is_contiguous() and math.isfinite(squared[1])
    assert squared == pytest.approx(
        [p.grad.double().square().sum().item() for p in params],
        rel=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2,
    )


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_private_apis_kept_for_speed_still_work_as_the_loop_uses_them(name):
    """The fused optimizers skip their step when `found_inf` (GradScaler's attribute) holds 1, and step when
    it holds 0: the loop sets it so that a non-finite batch takes no step without the host waiting for it."""
    for flag, moved in ((1.0, False), (0.0, True)):
        param = torch.nn.Parameter(torch.ones(4))
        optimizer = (torch.optim.Adam if name == "adam" else torch.optim.SGD)([param], lr=0.1, fused=True)
        param.grad = torch.ones(4)
        optimizer.found_inf = torch.tensor(flag)
        optimizer.step()
        assert (not torch.equal(param.detach(), torch.ones(4))) == moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_private_apis_kept_for_speed_flag_a_non_finite_row_and_keep_it(dtype):
    """GradScaler's check (Steps.flag) sets the flag to exactly 1 (what the fused optimizers read) for a
    NaN or an infinity anywhere in the row, leaves it for a finite row, never clears it, and leaves the
    row's values as they are."""
    flag = torch.zeros(())
    bookkeeping = steps.Steps.__new__(steps.Steps)  # flag() needs nothing of an epoch but the flag itself
    bookkeeping.nonfinite, bookkeeping.one = flag, torch.ones(())
    for values, expected in [([1.5, 3e38, 0.0], 0.0), ([1.5, -math.inf, 2.0], 1.0), ([1.0, 2.0, 3.0], 1.0)]:
        row = torch.tensor(values, dtype=dtype)
        before = row.clone()
        bookkeeping.flag(row)
        assert flag.item() == expected and torch.equal(row, before)
    flag.zero_()
    bookkeeping.flag(torch.tensor([math.nan, 1.0], dtype=dtype))
    assert flag.item() == 1.0


def test_irrelevant_combination_is_not_trained(tiny_data, wandb_dir, tmp_path):
    code = run_main(*small_run(tiny_data, tmp_path, "--momentum", "0.9", "--wandb_project", "boilerplate-tests"))
    folder, res = results(tmp_path)
    assert code == 0 and res["tags"] == ["Irrelevant hyperparameters"] and res["history"] == []  # did as asked
    assert not (folder / "model.pt").exists()
    run = wandb_run(wandb_dir, folder.name)
    assert run.exit_code == 1 and run.tags == ["Irrelevant hyperparameters"] and run.history == []


def test_irrelevant_combination_trains_when_asked(tiny_data, tmp_path, capsys):
    code = run_main(*small_run(tiny_data, tmp_path, "--momentum", "0.9", "--abort_irrelevant", "no"))
    assert code == 0 and results(tmp_path)[1]["tags"][0] == "Success"
    assert "momentum" in capsys.readouterr().err


def test_timeout_keeps_the_history_so_far(tiny_data, tmp_path):
    # 500 steps of batch size 1 through 1024-wide layers outlast 0.2 s: the first epoch is cut short.
    # One sample's gradient can be near zero (confidently right), and how many batches run before the
    # deadline depends on the machine's load: the vanishing-gradient detector is off, so that the tags
    # are the timeout's alone however far the epoch got.
    code = run_main(
        *small_run(tiny_data, tmp_path, *demo.CRAWL, "--epoch_timeout", str(0.2 / 60), "--vanishing_threshold", "0")
    )
    _, res = results(tmp_path)
    assert code == 1 and res["status"] == "failed" and res["tags"] == ["Timeout"]
    assert len(res["history"]) == 1 and 0 < res["history"][0]["train/batches"] < res["constants"]["data/train_size"]


STOPS = [(signal.SIGINT, "User abort", 130), (signal.SIGTERM, "Preempted", 143)]


@pytest.mark.parametrize("signum, tag, status", STOPS)
def test_a_stop_before_the_run_begins_ends_the_process_at_once_or_after_what_it_is_finishing(signum, tag, status):
    with watch.Link() as link, pytest.raises(SystemExit) as at_once:
        os.kill(os.getpid(), signum)  # while the data loads, say: nothing to finish first
    assert at_once.value.code == status
    finished = []
    with watch.Link() as link, pytest.raises(SystemExit) as deferred, link.deferred():
        os.kill(os.getpid(), signum)  # a run folder being made, W&B starting: finished before the stop acts
        finished.append(True)
    assert finished and deferred.value.code == status


@pytest.mark.parametrize("signum, tag, status", STOPS)
def test_a_stop_as_the_run_begins_ends_it_at_the_first_batch(signum, tag, status, tiny_data, wandb_dir, tmp_path):
    class StoppedAsItBegins(runs.Record):
        def start(self, constants):
            super().start(constants)
            os.kill(os.getpid(), signum)  # heard while the run begins: the run exists, and stops at the first batch

    args = parse(*small_run(tiny_data, tmp_path, "--save", "no", "--wandb_project", "boilerplate-tests"))
    args.device = "cpu"
    opts = vars(args)
    record = StoppedAsItBegins(opts, {**opts, "group": "a-group"}, None, [])
    with watch.Link() as link:
        session.train(experiment(), args, None, False, record, link)
    assert record.tags == [tag] and record.history == [] and record.status == 1
    run = wandb_run(wandb_dir, record.run_path.split("/")[-1])
    assert run.tags == [tag] and run.exit_code == 1 and epoch_rows(run.history) == []


def test_wandb_disabled_trains_and_records_no_run_path(tiny_data, wandb_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_main(*small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests")) == 0
    _, res = results(tmp_path / "out")
    assert res["tags"] == ["Success"] and res["wandb_run_path"] is None
    assert not list(wandb_dir.glob("wandb/*run-*"))


@pytest.fixture
def wandb_server(monkeypatch):
    """A local HTTP server as W&B's: it answers (every request with an error), so W&B is reachable."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def test_wandb_without_login_is_a_clear_error_before_training(
    tiny_data, wandb_dir, wandb_server, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_main(*small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests")) == 1
    err = capsys.readouterr().err
    assert "W&B could not start" in err and "wandb login" in err and "WANDB_MODE=offline" in err
    assert not list((tmp_path / "out").glob("*/*"))  # nothing trained, nothing saved


def test_a_wandb_mode_wandb_rejects_is_a_clear_error_naming_it(tiny_data, wandb_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "sideways")
    assert run_main(*small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests")) == 1
    err = capsys.readouterr().err
    assert "W&B could not start" in err and "sideways" in err and "wandb login" not in err
    assert not list((tmp_path / "out").glob("*/*"))  # nothing trained, nothing saved


def test_a_wandb_project_wandb_refuses_online_is_named_without_advice_to_go_offline(
    tiny_data, wandb_dir, wandb_server, tmp_path, monkeypatch, capsys
):
    """WANDB_PROJECT set to "entity/project" (the usual slip): the offline mode would refuse it too, so the
    message says to check the variables, as it does for a key that is there, not to log offline."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_PROJECT", "my-team/mnist")
    assert run_main(*small_run(tiny_data, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "W&B could not start (UsageError: Invalid project name 'my-team/mnist'" in err, err
    assert "Check W&B's WANDB_ variables" in err and "WANDB_MODE=offline" not in err, err
    assert "Traceback" not in err and not list((tmp_path / "out").glob("*/*"))


def test_a_wandb_variable_wandb_refuses_is_named_with_wandb_on_or_off(
    tiny_data, wandb_dir, tmp_path, monkeypatch, capsys
):
    """An empty WANDB_SWEEP_ID, which W&B refuses even in its disabled mode: with a project, the run cannot
    start and says why, without advising the offline mode it is in; without one, the run warns, naming W&B's
    reason, that a wandb.log of a fork's own will fail (as it would in any W&B script: a fork that has one
    then ends as a bug, the demo trains on)."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "")
    assert run_main(*small_run(tiny_data, tmp_path / "on", "--wandb_project", "boilerplate-tests")) == 1
    err = capsys.readouterr().err
    assert "W&B could not start (UsageError: Sweep ID cannot be empty)" in err and "WANDB_MODE=" not in err
    assert "Traceback" not in err and not list((tmp_path / "on").glob("*/*"))
    run_main(*small_run(tiny_data, tmp_path / "off"))
    warning = "Warning: W&B's disabled run could not start (UsageError: Sweep ID cannot be empty)"
    assert capsys.readouterr().err.startswith(warning)  # before anything the training code may have raised


def test_an_unwritable_wandb_dir_is_a_clear_error_before_training(tiny_data, wandb_dir, tmp_path, monkeypatch, capsys):
    # W&B itself would log into a temporary folder instead, which a reboot may empty.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "wandb"))
    assert run_main(*small_run(tiny_data, tmp_path / "out", "--wandb_project", "boilerplate-tests")) == 1
    err = capsys.readouterr().err
    assert "cannot save under WANDB_DIR" in err and str(blocker) in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*/*"))  # nothing trained, nothing saved


def test_unwritable_output_path_fails_before_training(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_main(*small_run(tiny_data, blocker / "out")) == 1
    assert "--output_path" in capsys.readouterr().err


def test_a_damaged_data_file_is_a_clear_error(tiny_data, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data, broken)
    images = demo.damage(broken, "train")
    assert run_main(*small_run(broken, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "could not be read" in err and str(images.parent) in err


def test_val_size_larger_than_the_training_set_is_a_usage_error(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_main(*small_run(tiny_data, tmp_path), "--val_size", str(demo.TINY_TRAIN))
    assert exit_.value.code == 2 and "--val_size" in capsys.readouterr().err


def test_the_largest_seed_trains(tiny_data, tmp_path):
    assert run_main(*small_run(tiny_data, tmp_path, "--seed", str(2**63 - 1), "--epochs", "1")) == 0
    assert results(tmp_path)[1]["seed"] == 2**63 - 1


@pytest.mark.parametrize(
    "device, why",
    [
        ("nonsense", "Expected one of cpu, cuda"),  # in $DEVICE, the default of --device
        ("cuda:99", "no such CUDA device"),
        ("meta", "Cannot copy out of meta tensor"),  # a device of shapes alone: it raised in the training code
    ],
)
def test_unusable_device_is_a_usage_error(device, why, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEVICE", device)
    with pytest.raises(SystemExit) as exit_:
        run_main(*small_run(tiny_data, tmp_path, "--device", ""))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --device: {device!r} cannot be used here" in err and why in err, err
    assert not list(tmp_path.glob("*/*"))


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


@pytest.mark.every_python
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("precision", options.PRECISIONS)
def test_a_resumed_run_is_exact_with_a_forks_own_random_draws(precision, device, tiny_data, tmp_path, monkeypatch):
    """A fork's augmentation drawing from numpy and Python's random: --seed seeds them, checkpoints
    keep their states (and the schedule's), so a run preempted after epoch 2 and resumed equals a run never
    stopped. On a GPU too, where the checkpoint's CPU generator states once failed to load."""
    calls, preempt_at, train_epoch = [], [], main.train_epoch

    class Noisy:  # the training batches, each with noise added
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def batches(self, size, generator=None):
            for x, y in self.data.batches(size, generator):
                noise = torch.from_numpy(np.random.normal(0, 1, tuple(x.shape))).float().to(x.device)
                yield x + noise * random.random(), y

    def augmented(model, optimizer, schedule, steps, args):
        calls.append(1)
        if len(calls) in preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption: the epoch is dropped
        steps.data = Noisy(steps.data)
        return train_epoch(model, optimizer, schedule, steps, args)

    monkeypatch.setattr(main, "train_epoch", augmented)
    # A warm-up, a cosine schedule and accumulated gradients: their state is the checkpoint's too.
    flags = ("--epochs", "4", "--precision", precision, "--lr_schedule", "cosine", "--warmup", "0.3")
    flags += ("--accumulate", "3", "--device", device)
    assert run_main(*small_run(tiny_data, tmp_path / "whole", *flags)) == 0
    preempt_at.append(len(calls) + 3)
    assert run_main(*small_run(tiny_data, tmp_path / "stopped", *flags)) == 1
    assert results(tmp_path / "stopped")[1]["tags"] == ["Preempted"]
    assert run_main(*small_run(tiny_data, tmp_path / "stopped", *flags, "--resume", "yes")) == 0
    whole, resumed = (results(tmp_path / name)[1]["history"] for name in ("whole", "stopped"))
    assert without_times(resumed) == without_times(whole)
    assert len({row["train/loss"] for row in whole}) == 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
def test_every_rank_takes_rank_zeros_state_on_its_device(device):
    """Under torchrun every rank starts from rank 0's snapshot (a resumed run's, or its first); on a GPU its
    CPU generator states once failed to load, so no job on GPUs could start. One process runs the same path."""

    def training_state(seed: int) -> dict:
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 2).to(device)
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        return {"model": model, "optimizer": optimizer, "generator": torch.Generator().manual_seed(seed)}

    rank0 = training_state(0)
    rank0["model"](torch.ones(3, 4, device=device)).sum().backward()
    rank0["optimizer"].step()
    snapshot = checkpoints.snapshot(3, rank0, [{"epoch": 1}], ["Success"])
    other = training_state(1)  # another rank: its own initialisation, no step taken yet
    assert distributed.restored(snapshot, other) == (3, [{"epoch": 1}], ["Success"])
    pairs = zip(other["model"].parameters(), rank0["model"].parameters(), strict=True)
    assert all(torch.equal(mine, theirs) and mine.device.type == device for mine, theirs in pairs)
    assert other["optimizer"].state_dict()["state"][0]["exp_avg"].device.type == device
    assert torch.equal(other["generator"].get_state(), rank0["generator"].get_state())


def test_torch_takes_the_cores_this_process_may_run_on(tiny_data, tmp_path, monkeypatch):
    """A sweep's worker, a job's share, taskset: the cores the process may use, not the machine's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {min(cores)})
        assert run_main(*small_run(tiny_data, tmp_path, "--epochs", "1")) == 0
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
    assert results(tmp_path)[1]["constants"]["torch/threads"] == 1


def test_a_class_missing_from_a_short_epoch_is_not_reported(caplog):
    # Macro F1 leaves the class out, as the baselines do; torcheval would log a warning for it.
    stats = metrics.metric_values(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), "train", 10)
    assert stats == {f"train/{name}": 1.0 for name in utils.METRIC_NAMES} and not caplog.records  # a fork's too


def test_verbosity_levels(tiny_data, tmp_path, capsys):
    assert run_main(*small_run(tiny_data, tmp_path / "quiet")) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and "epochs" not in quiet.err
    assert run_main(*small_run(tiny_data, tmp_path / "loud"), "--verbose", "2") == 0
    loud = capsys.readouterr()
    assert "epoch 2/2" in loud.out and "Run finished" in loud.out and "batches" in loud.err and "epochs" in loud.err


def test_each_epoch_line_is_one_write_so_runs_sharing_an_output_never_split_it(tiny_data, tmp_path, monkeypatch):
    # Parallel agents' runs write to one pipe, unbuffered under PYTHONUNBUFFERED (Docker images set it): a line
    # and its newline written apart let another run's line in between (CI: "epoch 1/" twice on one line).
    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Writes())
    assert run_main(*small_run(tiny_data, tmp_path / "out"), "--verbose", "1") == 0
    lines = [call for call in sys.stdout.calls if "epoch " in call]
    assert len(lines) == 2 and all(line.startswith("epoch ") and line.endswith("\n") for line in lines), lines


@pytest.mark.every_python
def test_bf16_learns_tags_stops_on_a_non_finite_loss_and_names_its_own_group(tiny_data, wandb_dir, tmp_path):
    args = ("--wandb_project", "boilerplate-tests")
    assert run_main(*small_run(tiny_data, tmp_path / "bf16", "--precision", "bf16", *args)) == 0
    folder, res = results(tmp_path / "bf16")
    assert res["tags"] == ["Success"] and res["history"][-1]["test/accuracy"] > 0.9
    assert wandb_run(wandb_dir, folder.name).config["precision"] == "bf16"
    assert run_main(*small_run(tiny_data, tmp_path / "fp32", *args)) == 0
    assert results(tmp_path / "fp32")[1]["group"] != res["group"]  # it changes results: a group of its own
    assert (
        run_main(
            *small_run(
                tiny_data,
                tmp_path / "nan",
                "--precision",
                "bf16",
                "--optimizer",
                "sgd",
                "--lr",
                "1e30",
                "--epochs",
                "3",
            )
        )
        == 1
    )
    folder, res = results(tmp_path / "nan")
    assert {"NaN loss", "Inf loss", "NaN gradient"} & set(res["tags"]) and len(res["history"]) == 1
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in torch.load(folder / "model.pt").values())


def test_bf16_where_it_cannot_run_is_a_usage_error_and_where_slow_a_warning(tiny_data, tmp_path, capsys, monkeypatch):
    # No device here both holds data and refuses bf16 (a GPU older than Ampere would): meta, which refuses
    # both, gives the check its reason, and the command line is shown a device with that reason
    why = devices.bf16_error(torch.device("meta"))
    assert why
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_:
        patch.setattr(devices, "bf16_error", lambda device: why)
        run_main(*small_run(tiny_data, tmp_path, "--precision", "bf16"))
    assert exit_.value.code == 2 and f"argument --precision: bf16 cannot run on cpu ({why}); use fp32" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN kept from the CPU's bf16 instructions
    assert run_main(*small_run(tiny_data, tmp_path, "--precision", "bf16", "--epochs", "1")) == 0
    assert "runs emulated here, slower than fp32" in capsys.readouterr().err


def test_a_cpu_without_bf16_instructions_is_named():
    assert devices.slow_bf16_cpu("fpu sse2 avx2 avx512f") and not devices.slow_bf16_cpu("fpu avx512f avx512_bf16")
    assert not devices.slow_bf16_cpu("amx_bf16 amx_tile") and devices.slow_bf16_cpu("avx512_bf16", "AVX512_CORE")


def test_a_debugger_in_this_process_is_seen(monkeypatch):
    """What keeps training in the debugged process (main.py's start): an IDE's debugger loaded, or a
    trace function set. pytest itself runs none here."""
    assert watch.debugger() is None
    previous = sys.gettrace()
    sys.settrace(lambda *event: None)
    try:
        assert watch.debugger() == "a trace function"
    finally:
        sys.settrace(previous)
    monkeypatch.setitem(sys.modules, "debugpy", type(sys)("debugpy"))  # as VS Code's debugger loads it
    assert watch.debugger() == "debugpy"
