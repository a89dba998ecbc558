"""main.py as users start it: a real `python main.py` process, real signals, real exit statuses."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import demo
from conftest import (
    OFFLINE,
    ROOT,
    Kernel,
    Output,
    calls_wandb,
    children,
    fork,
    results,
    small_run,
    start_main,
    training_process,
    wandb_epochs,
    whole_epochs,
)
from wandb_file import find_run, find_runs


@pytest.mark.every_python
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
    sessions = find_runs(tmp_path, folder.name)
    assert len(sessions) == 1, stdout + stderr  # one W&B session: the training process's own
    [run] = sessions
    assert run.exit_code == 1 and "User abort" in run.tags
    assert wandb_epochs(run.history) == whole_epochs(res["history"])


def test_a_stop_signal_repeated_until_the_end_changes_nothing(tiny_data, tmp_path):
    """The training process gets a Ctrl+C twice, from the terminal and forwarded by the guard, and
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
                os.kill(child, signal.SIGINT)  # the child alone: the guard saw only the first
            except ProcessLookupError:
                break
            time.sleep(0.002)
        stdout, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert "User abort" in stdout and "killed" not in stdout + stderr
    assert results(out)[1]["status"] == "failed" and results(out)[1]["tags"][-1] == "User abort"


STOPS_FROM_OUTSIDE = [
    (signal.SIGTERM, "job", "Preempted"),  # SLURM's preemption reaches every process of the job
    (signal.SIGTERM, "main.py", "Stopped"),  # wandb agent's stop command (and its second Ctrl+C), `kill PID`
    # A scheduler's warning of the job's end: SLURM's --signal=USR1@90 (which Lightning's auto-requeue asks
    # for) to every process, Grid Engine's -notify to the one it started. Until this test these were the
    # guard's own words: the run ended Stopped, or, sent to main.py alone, trained on unwarned.
    (signal.SIGUSR1, "job", "Preempted"),
    (signal.SIGUSR2, "main.py", "Preempted"),
    (signal.SIGUSR1, "training process", "Preempted"),
]


@pytest.mark.parametrize(
    ("signum", "to", "tag"), STOPS_FROM_OUTSIDE, ids=lambda v: v.name if isinstance(v, signal.Signals) else v
)
def test_a_stop_signal_from_outside_ends_the_run_with_its_tag_whichever_process_it_reaches(
    signum, to, tag, tiny_data, tmp_path
):
    """Resumable either way; only a preemption is marked for W&B to re-queue."""
    out = tmp_path / "out"
    args = small_run(tiny_data, out, "--epochs", "100000", "--verbose", "1", "--wandb_project", "boilerplate-tests")
    proc = start_main(args, env={**OFFLINE, "WANDB_DIR": str(tmp_path)})
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        if to == "job":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid if to == "main.py" else training_process(proc.pid), signum)
        stdout, stderr = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert tag == "Stopped" or "Stopping at the next batch: Preempted." in stderr, stderr
    folder, res = results(out)
    assert res["tags"][-1] == tag and (folder / "checkpoint.pt").exists()
    run = find_run(tmp_path, folder.name)
    assert run.tags[-1] == tag and run.exit_code == 1 and run.preempting == (tag == "Preempted")


@pytest.mark.timeout(240)
def test_in_a_jupyter_notebook_run_main_py_trains_in_the_kernel_and_leaves_it_as_it_was(tiny_data, tmp_path):
    """`%run main.py ...` in a notebook: the run trains in the kernel (its streams cannot be reconfigured;
    until this test, an AttributeError at main.py's first call), the kernel's interrupt button stops it as
    Ctrl+C does, and the kernel goes on as it was: its own Ctrl+C handler, no signal held back (after
    --help and a usage error too), its own streams, its state."""
    pytest.importorskip("jupyter_client", reason="requirements-tools.txt installs it, on Python 3.11 and later")
    kernel = Kernel(tmp_path, {**os.environ, **OFFLINE, "WANDB_DIR": str(tmp_path)})
    out = tmp_path / "out"
    run = f"%run {ROOT / 'main.py'} " + " ".join(small_run(tiny_data, out, "--verbose", "1"))
    # Its signal handlers and mask (ipykernel puts back its own SIGINT handler after each cell, not the others)
    signals = "import signal, sys\nprint([signal.getsignal(s) for s in signal.Signals], signal.pthread_sigmask(0, []))"
    try:
        as_it_was = kernel.run(signals + "\nkept = 42")
        text = kernel.run(run + " --wandb_project boilerplate-tests")
        assert "Tags: Success" in text and "Error" not in text, text
        assert kernel.run(signals) == as_it_was
        assert kernel.run("print(type(sys.stdout).__name__, kept)") == "OutStream 42\n"
        folder, res = results(out)
        assert res["tags"][0] == "Success" and find_run(tmp_path, folder.name).exit_code == 0
        shutil.rmtree(out)
        text = kernel.run(run + " --epochs 100000", until="epoch 2/", then=kernel.manager.interrupt_kernel)
        assert "Stopping at the next batch: User abort." in text and "SystemExit: 1" in text, text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        assert results(out)[1]["tags"][-1] == "User abort" and kernel.run(signals) == as_it_was
        for bad in ("--help", "--epochs -1"):
            kernel.run(f"%run {ROOT / 'main.py'} {bad}")
            assert kernel.run(signals) == as_it_was, bad
    finally:
        kernel.close()


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
    proc = start_main(
        ["--data_path", str(tmp_path / "nowhere"), "--device", "cpu"],
        env={"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed},
    )
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert str(tmp_path / "nowhere" / demo.DATA_FOLDER) in stderr and "--data_path" in stderr
    assert "Traceback" not in stderr


@pytest.mark.every_python
def test_bad_command_line_exits_2_without_traceback(tmp_path):
    proc = start_main(["--lr=-1"])
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "argument --lr" in stderr and "Traceback" not in stderr


def test_help_answers_without_loading_torch_or_wandb():
    code = (
        "import runpy, sys\nsys.argv = ['main.py', '--help']\n"
        "try:\n    runpy.run_path('main.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'wandb', 'torchvision') if m in sys.modules))"
    )
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


def test_wandb_service_dying_mid_run_costs_nothing_but_wandb_logging(tiny_data, tmp_path):
    """The run's own W&B calls outlive W&B's service. A fork's own call cannot (it raises): that run stops
    there, resumable, as test_wandb_faults shows; here it is told so by the end's tag."""
    out = tmp_path / "out"
    args = small_run(
        tiny_data, out, "--epochs", "40", "--batch_size", "8", "--verbose", "1", "--wandb_project", "boilerplate-tests"
    )
    proc = start_main(args, env={**OFFLINE, "WANDB_DIR": str(tmp_path)})
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        deadline = time.monotonic() + 60  # W&B is up once results.json is written (it starts as training does)
        while not list(out.glob("*/*/results.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        cores = children(training_process(proc.pid), b"wandb-core")  # W&B's service, started by training
        for core in cores:  # as the out-of-memory killer would
            os.kill(core, signal.SIGKILL)
        stdout, stderr = output.finish(120)
    finally:
        proc.kill()
    _, res = results(out)
    if calls_wandb(ROOT / "main.py"):  # a fork's own wandb.log met the dead service
        assert cores and proc.returncode == 1 and res["tags"][-1] == "W&B lost" and "Traceback" not in stderr, stderr
        return
    assert cores and proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "Warning: W&B failed" in stderr and "results.json holds every epoch" in stderr
    assert res["status"] == "finished" and res["tags"][0] == "Success" and len(res["history"]) == 40


@pytest.mark.parametrize(
    "end, said",
    [("os._exit(3)", "exited with status 3"), ("os.kill(os.getpid(), signal.SIGKILL)", "was killed by SIGKILL")],
)
def test_a_training_process_ending_unasked_before_its_run_began_is_named_and_leaves_nothing(
    end, said, tiny_data, tmp_path
):
    """A status the training process never gives by itself (a native library's exit, a library's sys.exit of
    its own, the kernel's kill) before the run began: one line names it, exit status 1, no folder left."""
    anchor = '    raw = Path(args.data_path, "MNIST", "raw").resolve()\n'
    folder = fork(tmp_path, (anchor, f"    import os\n    import signal\n\n    {end}\n"))
    out = tmp_path / "out"
    proc = start_main(small_run(tiny_data, out), script=folder / "main.py")
    _, stderr = Output(proc).finish()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert f"Error: the training process {said}" in stderr and "before the run began: nothing was trained." in stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.every_python
@pytest.mark.parametrize("watchdog", ["yes", "no"])
def test_a_forks_own_wandb_calls_land_in_the_run_and_each_epoch_stays_one_row(watchdog, tiny_data, tmp_path):
    """wandb.log in the batch loop, wandb.watch, a wandb.Table at the end: plain W&B, no project API."""
    folder = fork(
        tmp_path,
        ("import torch\n", "import wandb\n"),
        ("        optimizer.zero_grad(set_to_none=True)\n", "        wandb.log({'custom/batch_loss': loss.item()})\n"),
        ("    model.train()\n", "    if steps.epoch == 1:\n        wandb.watch(model, log='gradients', log_freq=4)\n"),
        (
            "\n\n# ====================================================================="
            "=========================\n# EVALUATION",
            "    if steps.epoch == args.epochs:\n"
            "        wandb.log({'custom/table': wandb.Table(columns=['epochs'], data=[[steps.epoch]])})\n",
        ),
    )
    args = small_run(tiny_data, tmp_path / "out", "--verbose", "1", "--watchdog", watchdog)
    env = {**os.environ, **OFFLINE, "WANDB_DIR": str(tmp_path), "WANDB_X_STATS_SAMPLING_INTERVAL": "0.1"}
    for logging in (["--save", "no"], ["--wandb_project", "boilerplate-tests"]):  # nor need they W&B on
        proc = subprocess.run(
            [sys.executable, str(folder / "main.py"), *args, *logging],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    folder, res = results(tmp_path / "out")
    run = find_run(tmp_path, folder.name)
    assert run.exit_code == 0 and wandb_epochs(run.history) == whole_epochs(res["history"]) == [1, 2]
    assert run.step_metrics["test/*"] == "epoch"  # the epoch rows are plotted against the epoch
    assert len([row for row in run.history if "custom/batch_loss" in row]) == 2 * res["history"][0]["train/batches"]
    logged = {key.split("/")[0] + "/" + key.split("/")[1] for row in run.history for key in row if "/" in key}
    # wandb.Table; wandb.watch's histograms, named after the model's parameters, whatever the model
    assert "custom/table" in logged and any(key.startswith("gradients/") for key in logged), logged
    # The Logs tab holds the training process's output, and the system metrics describe it (torch loaded).
    assert "epoch 2/2" in run.output and "Run finished" not in run.output  # printed after finish
    assert max(sample.get("proc.memory.rssMB", 0) for sample in run.stats) > 150


def test_the_guards_death_stops_training_cleanly_and_leaves_it_resumable(tiny_data, tmp_path):
    """main.py killed (`kill -9`, an agent's last resort; rarely the out-of-memory killer): training stops at
    once, as Stopped (no preemption: W&B must not re-queue it), resumable."""
    out, training, epochs = tmp_path / "out", None, 5  # a short resume: batch-size-1 steps crawl under load
    args = small_run(tiny_data, out, "--epochs", str(epochs), "--batch_size", "1", "--verbose", "1")
    proc = start_main(args)
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        training = training_process(proc.pid)
        proc.kill()
        stdout, stderr = output.finish(60)  # the output ends when the training process, which shares it, ends
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(training, signal.SIGKILL)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    folder, res = results(out)
    assert res["status"] == "failed" and res["tags"][-1] == "Stopped" and (folder / "checkpoint.pt").exists()
    assert "continue it with --resume yes" in stdout and len(res["history"]) < epochs
    resumed = start_main([*args, "--resume", "yes"])
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert [row["epoch"] for row in results(out)[1]["history"]] == list(range(1, epochs + 1))


@pytest.mark.every_python
def test_under_pdb_a_breakpoint_in_the_training_epoch_stops_there(tiny_data, tmp_path):
    """`python -m pdb main.py` (as an IDE's Debug button, in effect): training runs in the debugged process,
    not in a training process of the guard's, so the breakpoint stops; then the run goes on to its end."""
    script = ROOT / "main.py"
    line = next(n for n, text in enumerate(script.read_text().splitlines(), 1) if ".backward()" in text)
    out = tmp_path / "out"
    commands = f"tbreak {script}:{line}\ncontinue\nwhere\ncontinue\n"  # then EOF: pdb quits as it restarts
    # "--": Python 3.13.0's pdb takes the options after the script's name for its own (CPython gh-125115)
    done = subprocess.run(
        [sys.executable, "-m", "pdb", "--", str(script), *small_run(tiny_data, out, "--verbose", "1")],
        input=commands,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "Debugging (python -m pdb): training in this process" in done.stderr, done.stderr
    assert f"main.py({line})" in done.stdout and "Run finished" in done.stdout, done.stdout
    _, res = results(out)
    assert res["status"] == "finished" and len(res["history"]) == 2
