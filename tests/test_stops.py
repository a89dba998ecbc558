"""Every stop at every moment ends the run once and rightly: real `python main.py` processes, real signals
at the run's start and end, the sequence W&B's agent sends (and the real `wandb agent` against a local
stand-in of W&B's server), and a log file that follows the run whatever stdout is."""

import ast
import contextlib
import ctypes
import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import demo
from boilerplate import watch
from conftest import (
    OFFLINE,
    ROOT,
    Kernel,
    Output,
    children,
    fork,
    kill_as_the_end_is_written,
    results,
    small_run,
    start_main,
    training_process,
    training_process_of_rank,
)
from wandb_file import find_runs, whole_run

STOPS = {
    signal.SIGINT: ("User abort", 130),
    signal.SIGHUP: ("Hangup", 129),
    signal.SIGTERM: ("Preempted", 143),
    signal.SIGUSR1: ("Preempted", 143),  # a scheduler's warning of the job's end
    signal.SIGQUIT: ("User abort", 131),  # Ctrl+\: the training process dies of it, the guard ends the run
}
MOMENTS = [0.2, 0.6, 1.2, 2.0, 3.0, "W&B starting"]  # of the start: seconds after main.py's first line, or an event


def launch_env(wandb_dir: Path) -> dict[str, str]:
    return {**OFFLINE, "WANDB_DIR": str(wandb_dir)}


def launch(argv: list[str], wandb_dir: Path, **env) -> subprocess.Popen:
    return start_main(argv, cwd=wandb_dir, env={**launch_env(wandb_dir), **env}, stderr=subprocess.STDOUT)


def logged(data: Path, out: Path, *extra: str) -> list[str]:
    return small_run(data, out, "--verbose", "1", "--wandb_project", "boilerplate-tests", *extra)


def assert_finished_once(code: int, output: str, out: Path, wandb_dir: Path) -> None:
    """The run as it ends when nothing stops it: exit 0, finished, Success, one W&B session."""
    assert code == 0 and "Traceback" not in output and "Error" not in output, output
    folder, res = results(out)
    assert res["status"] == "finished" and res["tags"][0] == "Success" and len(res["history"]) == 2, res["tags"]
    assert not (folder / "checkpoint.pt").exists()
    [run] = find_runs(wandb_dir, folder.name)  # one W&B session: nobody re-opened the run to rewrite its end
    assert run.exit_code == 0 and run.tags == res["tags"] and not run.preempting


@pytest.mark.parametrize("line", ["Run finished", "Saved in"])
def test_a_preemption_as_the_run_ends_changes_nothing(line, tiny_data, tmp_path):
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = launch(logged(tiny_data, out), tmp_path)
        try:
            output = Output(proc)
            output.wait_for(lambda text: text.startswith(line))
            os.killpg(proc.pid, signal.SIGTERM)  # a scheduler's SIGTERM to every process of the job
            text, _ = output.finish()
        finally:
            proc.kill()
        assert_finished_once(proc.returncode, text, out, tmp_path)


@pytest.mark.every_python
def test_ctrl_c_held_down_through_the_end_changes_nothing(tiny_data, tmp_path):
    """SIGINT to the process group every 5 ms from the last epoch's line to the exit, as a key held down."""
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = launch(logged(tiny_data, out), tmp_path)
        try:
            output = Output(proc)
            output.wait_for(lambda text: text.startswith("epoch 2/2"))
            while proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.005)
            text, _ = output.finish()
        finally:
            proc.kill()
        assert_finished_once(proc.returncode, text, out, tmp_path)


def test_a_kill_as_the_end_is_written_changes_nothing(tiny_data, tmp_path):
    """The out-of-memory killer (or a `kill -9`) meets the training process while W&B finishes: the run had
    trained and been judged, so its end stands (never a finished run flipped to Crashed), written by the
    guard; and a kill after that end is written, as the process leaves, leaves the run's exit status."""
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = launch(logged(tiny_data, out), tmp_path)
        try:
            output = Output(proc)
            killed = kill_as_the_end_is_written(out, training_process(proc.pid), proc)
            text, _ = output.finish()
        finally:
            proc.kill()
        assert proc.returncode == 0 and "Traceback" not in text, text
        folder, res = results(out)
        assert res["status"] == "finished" and res["tags"] == ["Success"] and len(res["history"]) == 2, text
        assert not (folder / "checkpoint.pt").exists()
        last = find_runs(tmp_path, folder.name)[-1]  # the guard's sitting, where it wrote the end
        assert last.exit_code == 0 and last.tags == res["tags"] and not last.preempting
        if killed and "the guard writes it" in text:
            return
    pytest.fail("the kill never came while the end was being written")


def holding(pid: int) -> None:
    """Waits until main.py's first line has run in process `pid`: SIGINT held back, or SIGTERM handled (the
    guard's handlers come before it lets them through). Not SIGINT handled: Python's own start-up handles it,
    before main.py runs, and a signal there is Python's to take (SIGQUIT kills it, as before any script)."""
    deadline = time.monotonic() + 60
    while True:
        status = dict(
            line.split(":\t")
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith(("SigBlk", "SigCgt"))
        )
        if int(status["SigBlk"], 16) & 1 << (signal.SIGINT - 1) or int(status["SigCgt"], 16) & 1 << (
            signal.SIGTERM - 1
        ):
            return
        assert time.monotonic() < deadline, "main.py never began"
        time.sleep(0.001)


def test_main_py_holds_back_the_stop_signals_its_processes_act_on():
    """Its first line names them itself (importing watch.py would take the time it is there to save)."""
    first = ast.parse((ROOT / "main.py").read_text()).body
    held = next(node for node in first if isinstance(node, ast.If)).body[0].value.args[1]
    assert {f"signal.{element.attr}" for element in held.elts} == {f"signal.{s.name}" for s in watch.HELD}


def wait_for_wandb_core(proc: subprocess.Popen) -> int:
    """The pid of W&B's service, as soon as the training process has started it."""
    deadline = time.monotonic() + 120
    training = training_process(proc.pid)
    while not (cores := children(training, b"wandb-core")):
        assert time.monotonic() < deadline and proc.poll() is None, "W&B's service never started"
        time.sleep(0.002)
    return cores[0]


@pytest.mark.parametrize(
    ("signum", "after"),
    [(signum, after) for signum in (signal.SIGINT, signal.SIGTERM) for after in MOMENTS]
    + [(signal.SIGHUP, after) for after in (0.6, 2.0, "W&B starting")]  # handled as SIGINT is
    + [(signal.SIGUSR1, after) for after in (0.6, "W&B starting")]  # handled as SIGTERM is
    # Ctrl+\ too, from main.py's first line on: at 0 the guard has no handler yet, and holds it back till it has.
    + [(signal.SIGQUIT, after) for after in (0, 0.2)],  # later, below: killed as W&B starts, it leaves W&B's files
    ids=lambda value: signal.Signals(value).name if isinstance(value, signal.Signals) else str(value),
)
def test_a_stop_at_any_moment_of_the_start_is_clean(signum, after, tiny_data, tmp_path):
    """While the guard, Python, torch, the data, the model and W&B start. Which of them the signal meets
    after so many seconds depends on the machine's speed; what must hold does not."""
    tag, status = STOPS[signum]
    out = tmp_path / "out"
    proc = launch(logged(tiny_data, out, "--epochs", "100000"), tmp_path)
    try:
        output = Output(proc)
        holding(proc.pid)  # the start is main.py's first line: Python's own start-up is before it
        if after == "W&B starting":
            wait_for_wandb_core(proc)
        else:
            time.sleep(after)
        os.killpg(proc.pid, signum)  # a terminal's Ctrl+C or hangup, a scheduler's SIGTERM: the whole process group
        text, _ = output.finish()
    finally:
        proc.kill()
    assert "Traceback" not in text and "Error: None" not in text, text
    saved = list(out.glob("*/*/results.json"))
    if not saved:  # stopped before the run began: nothing left behind, not even a folder
        cause = watch.CAUSES[signum]
        assert proc.returncode == status and f"Stopped by {cause} before the run began" in text, text
        assert not (out.exists() and list(out.rglob("*"))) and not list(tmp_path.glob("wandb/*run-*"))
        return
    folder, res = results(out)  # the run had begun: it ends with its tag, and is truly resumable
    assert proc.returncode == 1 and res["status"] == "failed" and res["tags"][-1] == tag, text
    # Every epoch trained to its end is in the checkpoint; a stop within the first leaves none (Ctrl+C's
    # history keeps that epoch's batches so far; a preemption drops them): a resume starts it again.
    assert (folder / "checkpoint.pt").exists() or not any(row["evaluated"] for row in res["history"]), res
    run = whole_run(tmp_path, folder.name)
    assert run.exit_code == 1 and run.tags[-1] == tag and run.preempting == (tag == "Preempted")


def test_ctrl_backslash_ends_the_run_at_once_as_a_second_ctrl_c_does(tiny_data, tmp_path):
    """Ctrl+\\ (SIGQUIT to every process in the terminal) kills the training process at once, as Linux's
    default has it, and the guard, outliving it, ends the run `User abort`, resumable, in results.json
    and W&B. Before, the guard died of it too, and results.json said `running` for good."""
    out = tmp_path / "out"
    proc = launch(logged(tiny_data, out, "--epochs", "100000"), tmp_path)
    try:
        output = Output(proc)
        output.wait_for(lambda text: text.startswith("epoch 2/"))
        os.killpg(proc.pid, signal.SIGQUIT)
        text, _ = output.finish()
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Ctrl+\\: ending the run now." in text and "Traceback" not in text, text
    folder, res = results(out)
    assert res["status"] == "failed" and res["tags"][-1] == "User abort" and (folder / "checkpoint.pt").exists()
    assert [row["epoch"] for row in res["history"] if row["evaluated"]][:2] == [1, 2]
    run = whole_run(tmp_path, folder.name)
    assert run.exit_code == 1 and run.tags == res["tags"] and not run.preempting


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_that_kills_a_process_the_training_code_runs_ends_the_run_as_that_stop(signum, tiny_data, tmp_path):
    """Ctrl+C, or a scheduler's SIGTERM, reaches every process of the job, a helper the training code runs
    too, which then fails (torch.compile's C++ compiler, killed as it compiled the first epoch with --compile
    yes; here `sleep`, run with check=True): the run ends with the stop's tag, resumable, the helper's error
    in one line. Until this test: `Exception`, a traceback, and advice to fix the code."""
    helper = "    if steps.epoch == 2:  # a process the training code runs\n"
    helper += "        subprocess.run(['sleep', '60'], check=True)\n"
    script = fork(tmp_path, ("    model.train()\n", helper), ("import math\n", "import subprocess\n")) / "main.py"
    out = tmp_path / "out"
    proc = start_main(logged(tiny_data, out), script, cwd=tmp_path, env=launch_env(tmp_path), stderr=subprocess.STDOUT)
    try:
        output, deadline = Output(proc), time.monotonic() + 120
        while not (trained := children(proc.pid, b"main.py")) or not children(trained[0], b"sleep"):
            assert proc.poll() is None and time.monotonic() < deadline, "the helper never ran"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        text, _ = output.finish()
    finally:
        proc.kill()
    tag = STOPS[signum][0]
    assert proc.returncode == 1 and "CalledProcessError" in text and "Traceback" not in text, text
    folder, res = results(out)
    assert res["tags"] == [tag] and (folder / "checkpoint.pt").exists(), text
    assert [row["epoch"] for row in res["history"] if row["evaluated"]] == [1], text
    [run] = find_runs(tmp_path, folder.name)
    assert run.exit_code == 1 and run.tags == [tag]


def in_a_terminal(argv: list[str], cwd: Path, stderr=None, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`argv` run in a terminal of its own (a pseudo-terminal, as ssh gives one): its session's controlling
    terminal, its stdin and stdout (stderr too, unless given). Returns the process and the terminal's other
    end: closing that is the terminal closing, as when an ssh session drops."""
    master, slave = os.openpty()

    def take_the_terminal():  # as a login shell does
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env or {**os.environ, **launch_env(cwd)},
        stdin=slave,
        stdout=slave,
        stderr=slave if stderr is None else stderr,
        start_new_session=True,
        preexec_fn=take_the_terminal,
    )
    os.close(slave)
    return proc, master


def until_seen(master: int, text: bytes, log: Path | None = None) -> None:
    """Reads the terminal (else it fills, and the run waits on it) until `text` shows there or in `log`."""
    shown, deadline, held = b"", time.monotonic() + 120, True
    while text not in shown and not (log and log.exists() and text in log.read_bytes()):
        assert time.monotonic() < deadline, shown.decode(errors="replace")
        if not held:
            time.sleep(0.1)
        elif select.select([master], [], [], 0.1)[0]:
            try:
                shown += os.read(master, 65536)
            except OSError:  # EIO: nothing holds the terminal any more (nohup let go of it)
                held = False


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_a_closed_terminal_ends_the_run_as_a_hangup_and_nohup_keeps_it_going(nohup, tiny_data, tmp_path):
    """An ssh session that drops closes the terminal: Linux sends SIGHUP to the processes in it (the guard
    and the training process alike), and every write to the terminal fails from then on. The run ends once
    and rightly: `Hangup`, resumable, in results.json and W&B, with no traceback. Under nohup, which starts
    main.py ignoring SIGHUP, the run trains on to its end."""
    out, stderr = tmp_path / "out", tmp_path / "stderr.log"
    argv = [sys.executable, str(ROOT / "main.py"), *logged(tiny_data, out, "--epochs", "30" if nohup else "100000")]
    with open(stderr, "w") as errors:
        proc, master = in_a_terminal(["nohup", *argv] if nohup else argv, tmp_path, errors)
    try:
        until_seen(master, b"epoch 1/", tmp_path / "nohup.out")  # nohup sends stdout there, from a terminal
        assert results(out)[1]["status"] == "running"
        os.close(master)
        proc.wait(120)
    finally:
        proc.kill()
    text = stderr.read_text()
    assert "Traceback" not in text, text
    folder, res = results(out)
    run = whole_run(tmp_path, folder.name)
    if nohup:
        assert proc.returncode == 0 and res["status"] == "finished" and len(res["history"]) == 30, (text, res["tags"])
        assert run.exit_code == 0 and run.tags == res["tags"] and res["tags"][0] == "Success"
        return
    assert proc.returncode == 1 and res["status"] == "failed" and res["tags"][-1] == "Hangup", (text, res["tags"])
    assert (folder / "checkpoint.pt").exists()
    assert run.exit_code == 1 and run.tags == res["tags"] and not run.preempting


def read_to_the_end(proc: subprocess.Popen, master: int) -> str:
    """What the terminal shows until the process has ended (read as it goes: a full terminal holds the run)."""
    shown, deadline = b"", time.monotonic() + 120
    while proc.poll() is None or select.select([master], [], [], 0.1)[0]:
        assert time.monotonic() < deadline, shown.decode(errors="replace")
        if select.select([master], [], [], 0.1)[0]:
            try:
                shown += os.read(master, 65536)
            except OSError:  # EIO: nothing holds the terminal any more
                break
    proc.wait(60)
    return shown.decode(errors="replace")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "answer", ["late", "ctrl+c", "ctrl+d", "closed", "late, under torchrun", "rank 1 stopped, under torchrun"]
)
def test_a_person_at_wandbs_login_prompt_has_all_the_time_and_a_ctrl_c_there_ends_the_run_at_once(
    answer, tiny_data, wandb_server, tmp_path
):
    """A first run online, on a terminal, with no W&B key anywhere: W&B asks for one, as in any W&B script.
    A person answers in their own time, longer than W&B's start may take (limit(): 34 s here), and the
    run logs to W&B's server with the key, which W&B keeps in ~/.netrc. A Ctrl+C at the key's prompt (which
    hides what is typed) ends the run before it began, at once: exit 130, nothing left, the terminal
    echoing again. Before, the start counted the person's time and gave W&B up as hung, and the Ctrl+C
    waited for that. Ctrl+D at the prompt (its input ended) is a start error saying so, exit 1; the terminal
    closed there, a hangup before the run began, exit 129 (before, both ended as a SIGINT's death). Under
    torchrun rank 0 asks, and the other rank waits for it past --epoch_timeout, which bounds an epoch (until
    this test that wait ended there, and the job with it); a stop signal to the waiting rank alone (`kill
    PID`) ends the job before the run began, at once (it was heard only once rank 0 came)."""
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    env = {**os.environ, **launch_env(tmp_path), **wandb_server.environment(), "HOME": str(home)}
    env.update(WANDB_X_SERVICE_WAIT="8", WANDB_INIT_TIMEOUT="4")  # limit() = 2 * (8 + 4) + 10 s
    for variable in ("WANDB_API_KEY", "WANDB_SILENT", "NETRC"):
        env.pop(variable, None)
    argv = [sys.executable, str(ROOT / "main.py"), *logged(tiny_data, out)]
    if answer.endswith("under torchrun"):
        argv[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        argv += ["--epoch_timeout", "0.1"]  # 6 s
    proc, master = in_a_terminal(argv, tmp_path, env=env)
    shown, echoing, asked = "", True, time.monotonic()
    try:
        until_seen(master, b"Enter your choice")
        if answer.startswith("late"):
            time.sleep(36 if answer == "late" else 10)
        if answer == "ctrl+d":
            os.write(master, b"\x04")
        elif answer == "closed":
            os.close(master)  # the terminal closes: Linux sends SIGHUP to the processes in it
            master = None
            proc.wait(60)
        else:
            os.write(master, b"2\n")  # an existing W&B account
            until_seen(master, b"hit enter")
            assert not termios.tcgetattr(master)[3] & termios.ECHO  # what is typed is hidden
            if answer == "ctrl+c":
                asked = time.monotonic()
                os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl+C: its whole foreground group
            elif answer.startswith("rank 1"):
                asked = time.monotonic()
                os.kill(training_process_of_rank(proc.pid, 1), signal.SIGTERM)
            else:
                os.write(master, b"k" * 40 + b"\n")
        if master is not None:
            shown = read_to_the_end(proc, master)
            echoing = termios.tcgetattr(master)[3] & termios.ECHO
    finally:
        proc.kill()
        if master is not None:
            os.close(master)
    if answer.startswith("rank 1"):  # torchrun ends the job as a rank failed, with its own traceback
        assert proc.returncode == 1 and time.monotonic() - asked < 30 and echoing, shown
        assert shown.count("Stopped by SIGTERM before the run began") == 2, shown
        assert not list(out.rglob("*")) and not wandb_server.runs and not (home / ".netrc").exists()
        return
    assert "Traceback" not in shown and echoing, shown
    if not answer.startswith("late"):
        status, said = {"ctrl+c": (130, "Stopped by Ctrl+C before"), "ctrl+d": (1, "Error: W&B's login was left")}.get(
            answer, (129, "")
        )
        assert proc.returncode == status and time.monotonic() - asked < 30 and said in shown, shown
        assert not list(out.rglob("*")) and not list(tmp_path.glob("wandb/*run-*")), shown
        assert not wandb_server.runs and not (home / ".netrc").exists()
        return
    folder, res = results(out)
    assert proc.returncode == 0 and res["tags"] == ["Success"] and "hung" not in shown, shown
    server_run = wandb_server.runs[folder.name]
    assert server_run.tags == ["Success"] and len(server_run.history) == 2, shown
    assert "k" * 40 in (home / ".netrc").read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("answer", ["late", "interrupt", "no one there"])
def test_in_a_notebook_wandbs_login_prompt_has_all_the_time_and_the_interrupt_button_ends_the_run_at_once(
    answer, tiny_data, wandb_server, tmp_path
):
    """`%run main.py` in a Jupyter notebook, a first run online with no W&B key anywhere: W&B asks for one
    through the notebook, as in any W&B notebook. Answered past the start's limit (34 s here), the run logs
    to W&B's server with the key, which W&B keeps (until this test the start gave W&B up as hung while the
    person copied the key, and the key was lost). The interrupt button at the key's prompt ends the run
    before it began, at once, nothing left, the kernel as it was. A notebook run with no one there to answer
    (papermill, nbconvert: no input requests) is a start error saying so."""
    pytest.importorskip("jupyter_client", reason="requirements-tools.txt installs it, on Python 3.11 and later")
    home, out = tmp_path / "home", tmp_path / "out"
    env = {**os.environ, **launch_env(tmp_path), **wandb_server.environment(), "HOME": str(home)}
    env.update(WANDB_X_SERVICE_WAIT="8", WANDB_INIT_TIMEOUT="4")  # limit() = 2 * (8 + 4) + 10 s
    for variable in ("WANDB_API_KEY", "WANDB_SILENT", "NETRC"):
        env.pop(variable, None)
    kernel, asked = Kernel(home, env, server=True), []

    def person(prompt: str) -> str | None:
        if "choice" in prompt:
            return "2"  # an existing W&B account
        asked.append(time.monotonic())
        if answer == "interrupt":
            return kernel.manager.interrupt_kernel()
        time.sleep(36)
        return "k" * 40

    signals = "import signal\nprint(signal.getsignal(signal.SIGINT), signal.pthread_sigmask(0, []))"
    try:
        as_it_was = kernel.run(signals)
        run = f"%run {ROOT / 'main.py'} " + " ".join(logged(tiny_data, out))
        text = kernel.run(run, answer=None if answer == "no one there" else person)
        assert kernel.run(signals) == as_it_was and "Traceback" not in text, text
    finally:
        kernel.close()
    if answer != "late":
        said = "Stopped by Ctrl+C before" if asked else "Error: W&B's login was left unanswered"
        assert said in text and ("StoppedBeforeStart: 130" if asked else "SystemExit: 1") in text, text
        assert not asked or time.monotonic() - asked[0] < 30, text
        assert not list(out.rglob("*")) and not list(tmp_path.glob("wandb/*run-*")), text
        assert not wandb_server.runs and not (home / ".netrc").exists()
        return
    folder, res = results(out)
    assert res["tags"] == ["Success"] and "hung" not in text, text
    server_run = wandb_server.runs[folder.name]
    assert server_run.tags == ["Success"] and len(server_run.history) == 2, text
    assert "k" * 40 in (home / ".netrc").read_text()


@pytest.mark.parametrize("stop", ["none", "ctrl+c"])
def test_a_reader_gone_from_the_output_ends_no_run(stop, tiny_data, tmp_path):
    """`python main.py 2>&1 | head -1`: once head has its line, every write the run makes fails (a broken
    pipe). `python main.py | tee log`, then Ctrl+C: the same Ctrl+C ends tee at once, and stdout's writes
    fail from then on (stderr, on the terminal, is a file here). The run ends as it would have: Success with
    every epoch, or `User abort`, in results.json and W&B, with the run's exit status and no traceback."""
    out, stderr = tmp_path / "out", tmp_path / "stderr.log"
    argv = logged(tiny_data, out, "--epochs", "30" if stop == "none" else "100000")
    with open(stderr, "w") as errors:
        proc = (
            launch(argv, tmp_path)
            if stop == "none"
            else start_main(argv, cwd=tmp_path, env=launch_env(tmp_path), stderr=errors)
        )
    try:
        deadline = time.monotonic() + 120
        while not proc.stdout.readline().startswith("epoch 1/"):
            assert time.monotonic() < deadline and proc.poll() is None
        proc.stdout.close()  # the reader goes
        if stop == "ctrl+c":
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    finally:
        proc.kill()
    folder, res = results(out)
    run = whole_run(tmp_path, folder.name)
    if stop == "none":
        assert proc.returncode == 0 and res["status"] == "finished" and len(res["history"]) == 30, res["tags"]
        assert run.exit_code == 0 and run.tags == res["tags"] and res["tags"][0] == "Success"
        return
    text = stderr.read_text()
    assert proc.returncode == 1 and res["status"] == "failed" and res["tags"] == ["User abort"], (text, res["tags"])
    assert run.exit_code == 1 and run.tags == res["tags"] and "Traceback" not in text, text


def a_thread_hearing(pid: int, signum: int) -> int:
    """A thread of process `pid` other than its main one that does not hold `signum` back."""
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        blocked = (task / "status").read_text().split("SigBlk:")[1].split()[0]
        if int(task.name) != pid and not int(blocked, 16) & 1 << (signum - 1):
            return int(task.name)
    raise AssertionError(f"process {pid} has no other thread that hears {signal.Signals(signum).name}")


def test_a_job_wide_sigterm_is_a_preemption_whichever_thread_of_training_runs_its_handler(tiny_data, tmp_path):
    """Linux hands a process's signal to any of its threads. A job's SIGTERM reaches the guard, which tells
    the training process to stop (watch.GUARD_STOP: its main thread, asleep, takes it at once), and the
    training process, where another thread runs the handler's C half a little later. The main thread,
    waiting on W&B's start (held here for longer than watch.TERM_GRACE), must still hear it as the job's
    SIGTERM: the run is Preempted, not Stopped."""
    out = tmp_path / "out"
    proc = launch(logged(tiny_data, out, "--epochs", "100000"), tmp_path)
    try:
        output = Output(proc)
        core, training = wait_for_wandb_core(proc), training_process(proc.pid)
        os.kill(core, signal.SIGSTOP)  # W&B's start waits on its service
        try:
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.3)
            sent = ctypes.CDLL(None, use_errno=True).tgkill(
                training, a_thread_hearing(training, signal.SIGTERM), signal.SIGTERM
            )
            assert sent == 0, os.strerror(ctypes.get_errno())
            time.sleep(watch.TERM_GRACE + 1)
        finally:
            os.kill(core, signal.SIGCONT)
        text, _ = output.finish()
    finally:
        proc.kill()
    folder, res = results(out)
    assert proc.returncode == 1 and res["status"] == "failed" and res["tags"][-1] == "Preempted", text
    assert (folder / "checkpoint.pt").exists() or not res["history"]
    run = whole_run(tmp_path, folder.name)
    assert run.exit_code == 1 and run.tags[-1] == "Preempted" and run.preempting


@pytest.mark.every_python
def test_the_agents_stop_then_kill_is_a_stop_never_a_preemption(tiny_data, tmp_path):
    """wandb agent's stop (and its second Ctrl+C) terminates main.py alone, and kills it 0.3 s later if
    it has not ended: the run is Stopped, resumable, and W&B does not re-queue it."""
    out = tmp_path / "out"
    proc = launch(logged(tiny_data, out, "--epochs", "100000"), tmp_path)
    try:
        output = Output(proc)
        output.wait_for(lambda text: text.startswith("epoch 2/"))
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        text, _ = output.finish()  # the output ends when the training process, which shares it, ends
    finally:
        proc.kill()
    assert "Traceback" not in text, text
    folder, res = results(out)
    assert res["status"] == "failed" and res["tags"][-1] == "Stopped" and (folder / "checkpoint.pt").exists()
    run = whole_run(tmp_path, folder.name)
    assert run.tags[-1] == "Stopped" and run.exit_code == 1 and not run.preempting


def test_one_ctrl_c_is_one_stop_whichever_process_hears_it_first(tiny_data, tmp_path):
    """A Ctrl+C reaches the guard and the training process at once. Here the guard is held (SIGSTOP)
    until the training process has reported its stop: the guard's own copy of the same Ctrl+C, acted on
    after that report, is not a second one. Batches take a while, so the run is still training then."""
    out = tmp_path / "out"
    proc = launch(logged(tiny_data, out, "--epochs", "100000", *demo.HEAVY_BATCHES), tmp_path)
    try:
        output = Output(proc)
        output.wait_for(lambda text: text.startswith("epoch 1/"))
        os.kill(proc.pid, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGINT)
        output.wait_for(lambda text: text.startswith("Stopping at the next batch"))
        os.kill(proc.pid, signal.SIGCONT)
        text, _ = output.finish()
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Ctrl+C again" not in text and "killed" not in text, text
    folder, res = results(out)
    assert res["status"] == "failed" and "User abort" in res["tags"] and (folder / "checkpoint.pt").exists()
    [run] = find_runs(tmp_path, folder.name)  # the training process wrote the end: the guard never re-opened it
    assert run.exit_code == 1 and "User abort" in run.tags


def agent_args(data: Path, out: Path) -> dict:
    """The agent's `--key=value` form of the small run's data and model (tests/demo.py), trained until stopped."""
    flags = demo.data_and_model(data)
    args = {flag.removeprefix("--"): value for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    return {**args, "epochs": 100000, "device": "cpu", "save": True, "output_path": str(out)}


def test_ctrl_c_three_times_to_the_real_wandb_agent_stops_the_run_as_stopped(tiny_data, wandb_server, tmp_path):
    """Plain `wandb agent SWEEP_ID` (no --forward-signals) starts each run in a process group of its own:
    the terminal's Ctrl+C reaches the agent alone. Its second terminates the run (SIGTERM to main.py), its
    third kills it: W&B must not re-queue a run the user stopped."""
    wandb_server.sweeps["sweep1"] = "program: main.py\nmethod: grid\nparameters:\n  lr: {values: [0.001]}\n"
    args = agent_args(tiny_data, tmp_path / "out")
    wandb_server.commands.append(
        {
            "type": "run",
            "run_id": "run1",
            "program": "main.py",
            "args": {name: {"value": value} for name, value in args.items()},
        }
    )
    env = {
        **os.environ,
        **wandb_server.environment(),
        "WANDB_PROJECT": "boilerplate-tests",
        "WANDB_DIR": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "PATH": python_first_on_path(tmp_path),
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "wandb", "agent", "sweep1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = Output(agent)
        output.wait_for(lambda text: text.startswith("epoch 2/"))
        for _ in range(3):  # Ctrl+C in the agent's terminal, three times
            os.killpg(agent.pid, signal.SIGINT)
            time.sleep(0.3)
        text, _ = output.finish()
    finally:
        agent.kill()
    assert "Traceback" not in text.split("Killing runs")[-1], text
    folder, res = results(tmp_path / "out")
    assert res["tags"][-1] == "Stopped" and res["status"] == "failed" and (folder / "checkpoint.pt").exists()
    run = wandb_server.runs["run1"]
    assert run.tags[-1] == "Stopped" and run.exit_code == 1 and not run.preempting


def python_first_on_path(folder: Path) -> str:
    """W&B's agent starts `python main.py`: the interpreter running the tests, even without its venv."""
    shims = folder / "shims"
    shims.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (shims / "python").symlink_to(sys.executable)
    return f"{shims}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.every_python
@pytest.mark.parametrize("stdout_to", ["file", "pipe"])
def test_a_log_file_follows_the_run_as_it_goes(stdout_to, tiny_data, tmp_path):
    """Not a terminal and no -u: each epoch's line reaches the log as it is printed; the log holds lines,
    not progress bars nor empty lines (stderr too, as SLURM writes both to one file); the interpreter's
    options (here -X faulthandler -W default) reach the training process."""
    out, log = tmp_path / "out", tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = [
        sys.executable,
        "-X",
        "faulthandler",
        "-W",
        "default",
        str(ROOT / "main.py"),
        *small_run(tiny_data, out, "--verbose", "1", "--epochs", "100000"),
    ]
    with open(log, "w") as file:
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=env,
            stdout=file if stdout_to == "file" else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        if stdout_to == "pipe":
            output = Output(proc)
            output.wait_for(lambda text: text.startswith("epoch 3/"))  # seen while the run goes on
        else:
            deadline = time.monotonic() + 120
            while not any(line.startswith("epoch 3/") for line in log.read_text().splitlines()):
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)
        training = training_process(proc.pid)
        cmdline = Path(f"/proc/{training}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:5] == [b"-X", b"faulthandler", b"-W", b"default"], cmdline
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        text = output.finish()[0] if stdout_to == "pipe" else log.read_text()
    finally:
        proc.kill()
    lines = text.splitlines()
    assert proc.returncode == 1 and any(line.startswith("Run failed") for line in lines), lines
    assert "\r" not in text and all(lines) and not any(line.startswith(("epochs:", "batches:")) for line in lines), text
