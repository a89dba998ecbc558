"""W&B's own faults are W&B's: its service (wandb-core) killed or frozen as it starts never hangs a run nor
tags it `Exception`; and when the guard takes a killed run over online, W&B's server ends up with every
epoch once. Real `python main.py` processes, the real W&B client, offline or against a local stand-in of
W&B's server (wandb_server.py)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_seams import OWN_WANDB_LOG, fork

from conftest import (
    OFFLINE,
    ROOT,
    WAIT,
    Output,
    calls_wandb,
    children,
    results,
    small_run,
    start_main,
    training_process,
    wandb_epochs,
    whole_epochs,
)
from wandb_file import find_runs, whole_run
from wandb_server import WandbServer

# W&B's own limits, short, so that a frozen service costs the test seconds, not minutes.
QUICK = {"WANDB_X_SERVICE_WAIT": "3", "WANDB_INIT_TIMEOUT": "3"}


def launch(argv: list[str], wandb_dir: Path, env: dict, script: Path = ROOT / "main.py") -> subprocess.Popen:
    return start_main(
        argv,
        script=script,
        cwd=wandb_dir,
        env={"WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true", **env},
        stderr=subprocess.STDOUT,
    )


def new_cores(training: int, seen: set, proc: subprocess.Popen, done=lambda: False) -> list[int]:
    """W&B services the training process starts from now on, as soon as each appears; none once done()."""
    deadline = time.monotonic() + 120
    while not (found := [pid for pid in children(training, b"wandb-core") if pid not in seen]):
        if time.monotonic() > deadline or proc.poll() is not None or done():
            return []
        time.sleep(0.002)
    seen.update(found)
    return found


def epochs_shown(output: Output) -> int:
    return sum(line.startswith("epoch ") for line in str(output).splitlines())


def test_ending_wandbs_killed_service_never_ends_the_process(wandb_dir):
    """W&B's own teardown calls sys.exit with its service's exit status when that is not 0: the -9 of a
    service end_services killed (one frozen as it started, say). It once ended a training process with
    status 247 before its run began, silently (CI, the frozen-0.2s case below). The teardown that replaces
    such a service returns, in this process."""
    import wandb

    from boilerplate import wandb_start

    wandb.init(project="boilerplate-tests")
    wandb_start.end_services()
    assert wandb_start.teardown(wandb) is True


@pytest.mark.parametrize(
    "what, after, every",
    [
        (signal.SIGKILL, 0.0, False),
        (signal.SIGKILL, 0.5, False),
        (signal.SIGKILL, 1.0, False),
        (signal.SIGKILL, 0.0, True),  # every service W&B starts dies: no W&B at all
        (signal.SIGSTOP, 0.0, False),
        (signal.SIGSTOP, 0.2, False),
        (signal.SIGSTOP, 1.0, False),  # frozen
    ],
    ids=[
        "killed-at-once",
        "killed-0.5s",
        "killed-1s",
        "killed-each-time",
        "frozen-at-once",
        "frozen-0.2s",
        "frozen-1s",
    ],
)
def test_wandbs_service_failing_as_it_starts_never_hangs_the_run_nor_blames_it(what, after, every, tiny_data, tmp_path):
    """The run trains until the test stops it with Ctrl+C, two epochs after the fault: on a fast machine W&B's
    start may be over within `after`, and the fault must still land on a live run (it once landed after the
    run's end, and nothing was there to name it)."""
    out = tmp_path / "out"
    proc = launch(
        small_run(tiny_data, out, "--verbose", "1", "--epochs", "100000", "--wandb_project", "boilerplate-tests"),
        tmp_path,
        {**OFFLINE, **QUICK},
    )
    hit = []
    try:
        output = Output(proc)
        training, seen = training_process(proc.pid), set()
        gone_on = lambda: "the run goes on without W&B" in str(output)  # noqa: E731
        while cores := new_cores(training, seen, proc, gone_on if every else lambda: False):
            time.sleep(after)
            for core in cores:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(core, what)
            hit += cores
            if not every:
                break
        shown, deadline = epochs_shown(output), time.monotonic() + 180
        # The run goes on after the fault; only a fork's own W&B call may end it (W&B lost, checked below).
        while epochs_shown(output) < shown + 2 and proc.poll() is None:
            assert time.monotonic() < deadline, str(output)
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        text, _ = output.finish(180)
    finally:
        proc.kill()
        for core in hit:  # a frozen service would outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(core, signal.SIGKILL)
    assert hit and proc.returncode == 1 and "Traceback" not in text, text
    assert "Warning: W&B" in text  # W&B's failure is named
    folder, res = results(out)
    assert res["status"] == "failed" and "Exception" not in res["tags"], text
    if res["tags"][-1] == "W&B lost" and calls_wandb(ROOT / "main.py"):  # a fork's own call met the dead service
        # (in its first epoch, where it calls W&B each batch: no epoch to keep, the run resumable)
        assert "your training code called it" in text and "continue it with --resume yes" in text, text
        return
    assert res["tags"][-1] == "User abort", text
    epochs = whole_epochs(res["history"])
    assert len(epochs) >= 2
    runs = find_runs(tmp_path, folder.name)
    if every:
        assert "the run goes on without W&B" in text
    if runs and runs[-1].exit_code is not None:  # W&B started after all (a second try): it holds every epoch
        assert sum(len(wandb_epochs(run.history)) for run in runs) == len(epochs) and runs[-1].tags == res["tags"]


def listening(training: int) -> bool:
    """Whether W&B's service has written its port file whole (W&B reads it once its last line is "EOF"): CI
    once froze a service that had created the file but not yet written it, and W&B, failing fast, tried again."""
    for path in Path(tempfile.gettempdir()).glob(f"*/port-{training}.txt"):
        with contextlib.suppress(OSError):
            if path.read_text().splitlines()[-1:] == ["EOF"]:
                return True
    return False


def test_a_forks_own_wandb_log_after_wandbs_start_hung_stops_the_run_resumable_never_as_a_bug(tiny_data, tmp_path):
    """W&B's service frozen as it starts: the run goes on without W&B, and no run (not even a disabled one)
    can start in that process now, so W&B refuses the fork's own wandb.log. That is W&B's fault too: the
    run stops there, `W&B lost`, resumable, saying W&B had hung."""
    folder = fork(tmp_path, edits=OWN_WANDB_LOG)
    argv = small_run(tiny_data, tmp_path / "out", "--verbose", "1", "--epochs", "4", "--wandb_project", "x")
    proc = launch(argv, tmp_path, {**OFFLINE, **QUICK}, script=folder / "main.py")
    cores = []
    try:
        output, training = Output(proc), training_process(proc.pid)
        cores = new_cores(training, set(), proc)
        # Frozen once it listens (it writes its port to a file named after the training process), so that
        # wandb.init waits on it: a service frozen before that fails fast, and W&B tries again. The training
        # process is held meanwhile: on a slow machine it once got as far as its run's start request, which
        # W&B's own init timeout answers (another try, a new service) instead of hanging.
        os.kill(training, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while not listening(training) and time.monotonic() < deadline:
                time.sleep(0.001)
            for core in cores:
                os.kill(core, signal.SIGSTOP)
        finally:
            os.kill(training, signal.SIGCONT)
        text, _ = output.finish(180)
    finally:
        proc.kill()
        for core in cores:
            with contextlib.suppress(ProcessLookupError):
                os.kill(core, signal.SIGKILL)
    assert cores and proc.returncode == 1 and "Traceback" not in text, text
    assert "W&B's start hung" in text and "your training code called it, W&B having hung in this process" in text
    assert "continue it with --resume yes" in text
    res = results(tmp_path / "out")[1]
    assert res["tags"][-1] == "W&B lost" and "Exception" not in res["tags"] and res["status"] == "failed"


def test_wandbs_service_dying_under_a_forks_own_wandb_log_stops_the_run_resumable_never_as_a_bug(tiny_data, tmp_path):
    """The run's own W&B calls outlive W&B's service (a warning, and on without it); a call of the fork's
    own meets the dead service first and raises in the training code. That is W&B's fault, not a bug:
    the run stops there, tagged `W&B lost`, and `--resume yes` goes on from the last checkpoint, W&B anew.
    The training process is held (SIGSTOP) while its service is killed, between two of its epochs."""
    folder = fork(tmp_path, edits=OWN_WANDB_LOG)
    out = tmp_path / "out"
    argv = small_run(tiny_data, out, "--verbose", "1", "--epochs", "4", "--wandb_project", "boilerplate-tests")
    proc = launch(argv, tmp_path, OFFLINE, script=folder / "main.py")
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 1/"))
        training = training_process(proc.pid)
        os.kill(training, signal.SIGSTOP)
        cores = children(training, b"wandb-core")
        for core in cores:
            os.kill(core, signal.SIGKILL)
        os.kill(training, signal.SIGCONT)
        text, _ = output.finish()
    finally:
        proc.kill()
    assert cores and proc.returncode == 1 and "Traceback" not in text, text
    assert "Warning: W&B failed while your training code called it (ConnectionResetError" in text
    assert "continue it with --resume yes" in text
    run_folder, res = results(out)
    assert res["tags"][-1] == "W&B lost" and "Exception" not in res["tags"] and res["status"] == "failed"
    assert whole_epochs(res["history"]) == [1] and (run_folder / "checkpoint.pt").exists()

    proc = launch([*argv, "--resume", "yes"], tmp_path, OFFLINE, script=folder / "main.py")
    text, _ = Output(proc).finish()
    assert proc.returncode == 0 and "Traceback" not in text, text
    _, res = results(out)
    assert res["tags"][0] == "Success" and whole_epochs(res["history"]) == [1, 2, 3, 4]
    epochs = wandb_epochs(whole_run(tmp_path, run_folder.name).history)  # epoch 1 if W&B wrote it before it died
    assert epochs[-3:] == [2, 3, 4] and len(epochs) == len(set(epochs)), epochs


def online_past_epoch_2(tiny_data, out: Path, server: WandbServer, epochs: int, then) -> tuple:
    """A run logging online to the stand-in `server`; then(pid of main.py, its Output) once epoch 2 is logged
    and saved. The process, ended, and its output."""
    proc = launch(
        small_run(tiny_data, out, "--verbose", "1", "--epochs", str(epochs), "--wandb_project", "boilerplate-tests"),
        out.parent,
        server.environment(),
    )
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        then(proc.pid, output)
        text, _ = output.finish()
    finally:
        proc.kill()
    return proc, text


def synced_back(command: str, cwd: Path, run_id: str):
    """The run `run_id` as a fresh stand-in server (the server back after an outage) holds it once
    `command`, a `wandb sync ...` a warning named, has run."""
    back = WandbServer()
    try:
        subprocess.run(
            [sys.executable, "-m", *command.split()],
            cwd=cwd,
            env={**os.environ, **back.environment()},
            capture_output=True,
            timeout=120,
            check=True,
        )
        return back.runs[run_id]
    finally:
        back.close()


@pytest.fixture
def wandb_server():
    server = WandbServer()
    yield server
    server.close()


def test_the_guard_gives_wandbs_server_every_epoch_a_killed_run_had_logged(tiny_data, wandb_server, tmp_path):
    """W&B uploads a run's history every few seconds and drops what it had not sent when the process it
    serves is killed (the out-of-memory killer's SIGKILL). The guard, taking the run over, logs what the
    server lacks before the end: the server holds each epoch once."""
    out = tmp_path / "out"
    proc, text = online_past_epoch_2(
        tiny_data, out, wandb_server, 100000, lambda pid, _: os.kill(training_process(pid), signal.SIGKILL)
    )
    assert proc.returncode == 1 and "Traceback" not in text, text
    folder, res = results(out)
    assert res["status"] == "failed" and res["tags"][-1] == "Crashed" and len(whole_epochs(res["history"])) >= 2
    run = wandb_server.runs[folder.name]
    assert wandb_epochs(run.history) == whole_epochs(res["history"])  # each once, none missing
    assert run.exit_code == 1 and run.tags[-1] == "Crashed" and wandb_server.sessions[folder.name] == 2
    assert "killed by SIGKILL" in run.summary["end"]


def test_the_guard_goes_by_wandbs_history_when_the_servers_summary_is_ahead_of_it(tiny_data, wandb_server, tmp_path):
    """W&B sends a row's summary apart from the row: a process killed between the two leaves the server's
    summary ahead of its history (CI, under load: the summary at epoch 1, the history empty, and the guard
    logged epoch 2 alone). Here the server loses the killed process's history and keeps its summaries."""
    out = tmp_path / "out"
    wandb_server.first_history_lost = True

    def summary_then_kill(pid, output):
        deadline = time.monotonic() + WAIT
        while not any(run.summary.get("epoch") for run in wandb_server.runs.values()):
            assert time.monotonic() < deadline, f"no summary reached the server; the output:\n{output}"
            time.sleep(0.05)
        os.kill(training_process(pid), signal.SIGKILL)

    proc, text = online_past_epoch_2(tiny_data, out, wandb_server, 100000, summary_then_kill)
    assert proc.returncode == 1 and "Traceback" not in text and "Warning" not in text, text
    folder, res = results(out)
    assert res["tags"][-1] == "Crashed" and len(whole_epochs(res["history"])) >= 2
    assert wandb_epochs(wandb_server.runs[folder.name].history) == whole_epochs(res["history"])  # each once


def test_a_history_the_guard_cannot_read_costs_a_warning_not_the_runs_end(tiny_data, wandb_server, tmp_path):
    """W&B's public API failing as the guard asks which epochs the server holds: it says so, goes by the
    summary, and still ends the run on the server."""
    out = tmp_path / "out"
    wandb_server.runs_unread = True
    proc, text = online_past_epoch_2(
        tiny_data, out, wandb_server, 100000, lambda pid, _: os.kill(training_process(pid), signal.SIGKILL)
    )
    assert proc.returncode == 1 and "Traceback" not in text, text
    assert "Warning: W&B's server did not say which epochs its history holds (CommError: " in text, text
    folder, res = results(out)
    run = wandb_server.runs[folder.name]
    assert run.exit_code == 1 and run.tags[-1] == "Crashed" and res["tags"][-1] == "Crashed"


def test_a_run_killed_in_an_outage_is_whole_on_the_server_after_the_sync_it_names(tiny_data, wandb_server, tmp_path):
    """W&B's server down (a gateway answers 503) when the training process is killed: the guard writes the
    run's end to W&B offline, and its warning names the one `wandb sync` that puts the whole run on the
    server once it is back: every epoch the dead process logged, once, and the end (Crashed, exit code 1)."""
    out = tmp_path / "out"

    def outage_then_kill(pid, output):
        wandb_server.outage = 503
        # Epoch 3 logged during the outage (and saved), however slow the machine: a fixed 1 s wait once
        # saw none logged, under two busy processes beside the test.
        output.wait_for(lambda line: line.startswith("epoch 3/"))
        os.kill(training_process(pid), signal.SIGKILL)

    proc, text = online_past_epoch_2(tiny_data, out, wandb_server, 100000, outage_then_kill)
    assert proc.returncode == 1 and "Traceback" not in text, text
    folder, res = results(out)
    assert res["tags"][-1] == "Crashed" and whole_epochs(res["history"])[-1] >= 3
    sync = re.search(r"`(wandb sync --include-online \S+ \S+)` uploads the whole run", text)
    assert sync, text
    run = synced_back(sync[1], tmp_path, folder.name)
    # Each epoch once, none missing. An epoch is logged to W&B, then saved to results.json: a kill between
    # the two leaves W&B's run file one whole epoch ahead (trained and evaluated; the resume trains it again).
    epochs, saved = wandb_epochs(run.history), whole_epochs(res["history"])
    assert epochs == list(range(1, len(epochs) + 1)) and epochs[: len(saved)] == saved, epochs
    assert len(epochs) - len(saved) in (0, 1), (epochs, saved)
    assert run.exit_code == 1 and run.tags[-1] == "Crashed" and "killed by SIGKILL" in run.summary["end"]


@pytest.mark.parametrize("lost", ["shut", "503"])
def test_wandbs_server_lost_mid_run_costs_seconds_and_loses_nothing(tiny_data, tmp_path, lost):
    """W&B's server gone mid-run (a network cut; an outage, where a gateway answers 503 for it): W&B retries
    its uploads far longer than any limit of ours, and the run's finish would wait on them for that limit
    (100 s). A W&B call waiting on a server that cannot be reached is given up at once instead: the run ends
    as trained, saying so, and the `wandb sync` its warning names uploads the whole run to the server once
    it is back."""
    server = WandbServer()
    out = tmp_path / "out"

    def lose(pid, _):
        if lost == "shut":
            server.close()
        else:
            server.outage = int(lost)

    try:
        proc, text = online_past_epoch_2(tiny_data, out, server, 4, lose)
    finally:
        server.close()
    assert proc.returncode == 0 and "Traceback" not in text, text
    folder, res = results(out)
    assert res["status"] == "finished" and res["tags"] == ["Success"] and whole_epochs(res["history"]) == [1, 2, 3, 4]
    warning = f"Warning: W&B's server was lost while finishing the run ({server.environment()['WANDB_BASE_URL']} is "
    assert warning + ("unreachable: it answers 503 Service Unavailable)" if lost == "503" else "") in text, text
    assert "W&B hung" not in text, text
    sync = re.search(r"`(wandb sync --include-online \S+)` uploads them", text)
    assert sync, text
    run = synced_back(sync[1], tmp_path, folder.name)  # what the warning says uploads the run whole
    assert wandb_epochs(run.history) == [1, 2, 3, 4] and run.exit_code == 0 and run.tags == ["Success"]


@pytest.mark.parametrize("refused", ["entity", "key"])
def test_a_run_wandbs_server_refuses_is_a_clear_error_not_an_offline_run(refused, tiny_data, wandb_server, tmp_path):
    """A key that may not log to the run's entity (a team the user is not in, a mistyped WANDB_ENTITY): W&B's
    server answers 403, "permission denied"; a key it does not know (revoked, mistyped): 401. The run said
    W&B was unreachable and logged offline, for a `wandb sync` the server would refuse the same; now it is a
    start error naming W&B's answer, the key and the entity."""
    wandb_server.denied.add("their-team")
    wandb_server.key_unknown = refused == "key"
    out = tmp_path / "out"
    argv = small_run(tiny_data, out, "--verbose", "1", "--wandb_project", "boilerplate-tests")
    proc = launch(argv, tmp_path, {**wandb_server.environment(), "WANDB_ENTITY": "their-team"})
    text, _ = Output(proc).finish(120)
    assert proc.returncode == 1 and "Error: W&B's server refused the run (" in text and "WANDB_ENTITY" in text, text
    answer = "permission denied" if refused == "entity" else "user is not logged in"
    assert answer in text and "wandb login --relogin" in text, text
    assert "unreachable" not in text and "Traceback" not in text, text
    assert "epoch 1/" not in text and not list(out.glob("*/*")) and not wandb_server.runs
    assert not list(tmp_path.glob("wandb/offline-run-*"))
