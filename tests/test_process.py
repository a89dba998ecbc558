"""main.py as users start it: a real `python main.py` process, real signals, real exit statuses."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OFFLINE, ROOT, Output, results, small_run, start_main, training_process, whole_epochs
from wandb_file import find_run


def test_ctrl_c_stops_cleanly_keeps_history_and_fails_the_run(tiny_data, tmp_path):
    out = tmp_path / "out"
    args = small_run(tiny_data, out, "--epochs", "100000", "--verbose", "1", "--wandb_project", "boilerplate-tests")
    proc = start_main(args, env={**OFFLINE, "WANDB_DIR": str(tmp_path)})
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))  # an epoch has been trained, logged and saved
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in a terminal does: the whole foreground group
        stdout, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "Run failed" in stdout and "User abort" in stdout
    folder, res = results(out)
    assert res["status"] == "failed" and "User abort" in res["tags"] and "Success" not in res["tags"]
    assert len(res["history"]) >= 2 and [r["epoch"] for r in res["history"]] == list(range(1, len(res["history"]) + 1))
    run = find_run(tmp_path, folder.name)
    assert run.exit_code == 1 and "User abort" in run.tags and whole_epochs(run.history) == whole_epochs(res["history"])


def test_a_stop_signal_repeated_until_the_end_changes_nothing(tiny_data, tmp_path):
    """The training process gets a Ctrl+C twice, from the terminal and forwarded by the watcher, and
    the second may come late, while it exits. Here it gets one every 2 ms until the run has ended."""
    out = tmp_path / "out"
    proc = start_main(small_run(tiny_data, out, "--epochs", "100000", "--verbose", "1"))
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        child = training_process(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        while proc.poll() is None:
            try:
                os.kill(child, signal.SIGINT)  # the child alone: the watcher saw only the first
            except ProcessLookupError:
                break
            time.sleep(0.002)
        stdout, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert "User abort" in stdout and "killed" not in stdout + stderr
    assert results(out)[1]["status"] == "failed" and results(out)[1]["tags"][-1] == "User abort"


def test_standalone_prints_a_summary_per_epoch_and_the_outcome(tiny_data, tmp_path):
    args = small_run(tiny_data, tmp_path / "out", "--verbose", "1", "--save", "no")
    proc = start_main(args)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "epoch 1/2" in stdout and "epoch 2/2" in stdout and "test" in stdout
    assert "Run finished" in stdout and "Tags: Success" in stdout
    assert not list((tmp_path / "out").rglob("*"))  # nothing left behind, not even an empty folder


def test_missing_data_says_where_it_looked_and_exits_1(tmp_path):
    # A proxy on a closed local port stands in for a machine without network: the download fails at once.
    closed = "http://127.0.0.1:9"
    proc = start_main(["--data_path", str(tmp_path / "nowhere"), "--device", "cpu"],
                      env={"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in stderr and "--data_path" in stderr
    assert "Traceback" not in stderr


def test_bad_command_line_exits_2_without_traceback(tmp_path):
    proc = start_main(["--lr=-1"])
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "argument --lr" in stderr and "Traceback" not in stderr


def test_help_answers_without_loading_torch_or_wandb():
    code = ("import runpy, sys\nsys.argv = ['main.py', '--help']\n"
            "try:\n    runpy.run_path('main.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'wandb', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "--wandb_project" in out and out.strip().endswith("[]")


def test_a_stop_signal_after_the_run_has_ended_changes_nothing(tiny_data, tmp_path):
    """A Ctrl+C key held down, an agent's late SIGTERM: the exit status is still the run's."""
    proc = start_main(small_run(tiny_data, tmp_path / "out", "--verbose", "1"))
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("Run finished"))
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            time.sleep(0.002)
        stdout, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert results(tmp_path / "out")[1]["status"] == "finished"


def wandb_core_of(pid: int) -> list[int]:
    """The W&B service processes main.py started (W&B starts each in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"wandb-core" in cmdline and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def test_wandb_service_dying_mid_run_costs_nothing_but_wandb_logging(tiny_data, tmp_path):
    out = tmp_path / "out"
    args = small_run(tiny_data, out, "--epochs", "40", "--batch_size", "8", "--verbose", "1",
                     "--wandb_project", "boilerplate-tests")
    proc = start_main(args, env={**OFFLINE, "WANDB_DIR": str(tmp_path)})
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        deadline = time.monotonic() + 60  # W&B is up once results.json is written (it starts as training does)
        while not list(out.glob("*/*/results.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        cores = wandb_core_of(proc.pid)
        for core in cores:  # as the out-of-memory killer would
            os.kill(core, signal.SIGKILL)
        stdout, stderr = output.finish(120)
    finally:
        proc.kill()
    assert cores and proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "Warning: W&B failed" in stderr and "results.json holds every epoch" in stderr
    _, res = results(out)
    assert res["status"] == "finished" and res["tags"][0] == "Success" and len(res["history"]) == 40


def fork_with_a_bug(tmp_path: Path) -> Path:
    """A copy of the project whose training code raises in its second epoch, as a user's bug would."""
    fork = tmp_path / "fork"
    fork.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "adjectives.txt", ROOT / "nouns.txt"]:
        shutil.copy(path, fork / path.name)
    source = (fork / "main.py").read_text()
    anchor = "        stats, stop_tag = train_epoch("
    assert anchor in source
    bug = "        if epoch == 2:\n            raise ValueError('a bug in the training code')\n"
    (fork / "main.py").write_text(source.replace(anchor, bug + anchor))
    return fork


@pytest.mark.parametrize("watchdog", ["yes", "no"])
def test_an_exception_in_the_training_code_fails_the_run_without_advice_to_resume(watchdog, tiny_data, tmp_path):
    fork, out = fork_with_a_bug(tmp_path), tmp_path / "out"
    args = small_run(tiny_data, out, "--epochs", "3", "--verbose", "1", "--wandb_project", "boilerplate-tests",
                     "--watchdog", watchdog)
    proc = subprocess.run([sys.executable, str(fork / "main.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **OFFLINE, "WANDB_DIR": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    assert "ValueError: a bug in the training code" in proc.stderr and "Traceback" in proc.stderr  # the user's own
    assert "--resume yes" not in proc.stdout + proc.stderr and "Crashed" not in proc.stdout + proc.stderr
    folder, res = results(out)
    assert res["status"] == "failed" and res["tags"][-1] == "Exception" and len(res["history"]) == 1
    assert not (folder / "checkpoint.pt").exists()  # nothing to resume: it would raise again
    run = find_run(tmp_path, folder.name)
    assert run.exit_code == 1 and "Exception" in run.tags and "raised an exception" in run.summary["end"]
