"""One run on several processes: real `torchrun` (gloo on this machine's CPUs), 2 ranks against 1 process,
real signals and a real SIGKILL of one rank. What holds for one process holds for the job."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from boilerplate.batches import FORK_MAY_HANG
from conftest import (
    OFFLINE,
    ROOT,
    WAIT,
    Output,
    children,
    descendants,
    fork,
    kill_as_the_end_is_written,
    results,
    training_process_of_rank,
    without_times,
)
from demo import SLOW, small_run
from wandb_file import find_runs

pytestmark = pytest.mark.timeout(300)
MAIN = ROOT / "main.py"

# SGD without dropout: 2 ranks at a global batch equal 1 process at that batch, to float tolerance.
EXACT = ("--optimizer", "sgd", "--lr", "0.1", "--seed", "3", "--checkpoint_every", "1")


# torchrun restarting a job: torch's own fault aside (test_a_job_torchrun_restarts_continues_its_run)
NO_STALE_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"  # torchrun's four, and SLURM's warnings


def torchrun(
    ranks: int, args: list[str], wandb_dir: Path, *options: str, env: dict | None = None, script: Path = MAIN
) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node RANKS [OPTIONS] main.py ARGS` (a free port each: tests may
    overlap), in a session of its own, as a shell starts a job; 1 rank with no OPTIONS is plain `python
    main.py`. W&B logs offline, unless `env` says otherwise; `script`: a fork's main.py."""
    alone = () if "--rdzv-endpoint" in options else ("--standalone",)  # (machines() joins two launchers)
    launcher = [sys.executable, "-m", "torch.distributed.run", *alone, f"--nproc_per_node={ranks}", *options]
    return subprocess.Popen(
        [*(launcher if ranks > 1 or options else [sys.executable]), str(script), *args],
        cwd=wandb_dir,
        # PYTHONFAULTHANDLER: a hung job's processes print their stacks as the test ends them (conftest.end_hung)
        env={**os.environ, **OFFLINE, "WANDB_DIR": str(wandb_dir), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(ranks: int, args: list[str], wandb_dir: Path, script: Path = MAIN) -> tuple[int, str, set[bytes]]:
    """The job's exit status, its output, and the command lines of the processes seen under it."""
    proc, programs = torchrun(ranks, args, wandb_dir, script=script), set()
    output, deadline = Output(proc), time.monotonic() + WAIT
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in descendants(proc.pid):
            with contextlib.suppress(OSError):
                programs.add(Path(f"/proc/{pid}/cmdline").read_bytes())
        time.sleep(0.05)
    text, _ = output.finish()
    return proc.wait(), text, programs


def weights(folder: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(folder / name, weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for row, other in zip(without_times(a), without_times(b), strict=True):
        assert row.keys() == other.keys()
        for key, value in row.items():
            assert other[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


# A fork whose metrics read the model's scores, not its predicted classes: top-5 accuracy and AUROC.
SCORES = ("    return logits.argmax(1)", "    return logits.float()  # the scores, for the metrics that read them\n")
SCORE_METRICS = (
    '    Metric("top5", "multiclass_accuracy", (("k", 5),), "the class among the 5 highest scores"),\n'
    '    Metric("auroc", "multiclass_auroc", (), "area under the ROC curve, each class against the rest"),\n'
)


@pytest.mark.parametrize(
    "batches",
    [pytest.param("on the device", marks=pytest.mark.every_python), "DataLoader", "accumulated", "compiled", "scores"],
)
def test_two_ranks_train_as_one_process_does(batches, tiny_data, tmp_path):
    """The same weights after two epochs, the same metrics each epoch, the same tags, the same group; rank
    0 alone writes the run (one W&B run, which records the processes). With --compile yes too: each rank
    compiles the model inside DDP's wrapper. And a fork whose metrics read the scores (rows of a score a
    class, not a class): the ranks' scores are gathered, and the run is judged by one (--monitor)."""
    extra = {"DataLoader": ["--workers", "1"], "accumulated": ["--accumulate", "3"], "compiled": ["--compile", "yes"]}
    extra = extra.get(batches, []) + (["--judge_by", "val/auroc"] if batches == "scores" else [])
    flags = [*EXACT, *extra, "--wandb_project", "boilerplate-tests"]
    script = MAIN
    if batches == "scores":
        script = fork(tmp_path, SCORES) / "main.py"
        table = script.with_name("utils.py")
        table.write_text(table.read_text().replace("METRICS = (\n", "METRICS = (\n" + SCORE_METRICS, 1))
    for ranks in (1, 2):
        code, text, programs = run(ranks, small_run(tiny_data, tmp_path / str(ranks), *flags), tmp_path, script)
        assert code == 0 and "Traceback" not in text, text
    # A Python whose fork() may hang in a threaded process: the job's DataLoader workers start from a fork server
    served = any(b"multiprocessing.forkserver" in program for program in programs)
    assert served == (batches == "DataLoader" and FORK_MAY_HANG), programs
    (one, alone), (two, job) = results(tmp_path / "1"), results(tmp_path / "2")
    assert one.parent.name == two.parent.name  # the group: the same experiment, whatever the processes
    # The same tags, whatever they are: a fork's model may still be guessing after two short epochs
    assert job["tags"] == alone["tags"] and "Success" in job["tags"]
    assert_same_history(alone["history"], job["history"])
    assert_same_weights(weights(one), weights(two))
    if batches == "scores":
        assert all(f"{split}/{name}" in job["history"][-1] for split in ("val", "test") for name in ("top5", "auroc"))
        assert job["best"]["best/val/auroc"] == max(row["val/auroc"] for row in job["history"])
    assert job["constants"]["torch/processes"] == 2 and alone["constants"]["torch/processes"] == 1
    [wandb_run] = find_runs(tmp_path, two.name)
    assert wandb_run.config["torch/processes"] == 2 and wandb_run.exit_code == 0
    assert len(list(tmp_path.glob("wandb/*run-*"))) == 2  # one W&B run a job, none from rank 1


@pytest.mark.every_python  # each Python's argparse reads abbreviations its own way
def test_every_option_has_a_spelling_torchrun_passes_on_to_main(capsys):
    """torchrun's parser reads the whole command line, the script's arguments too, and refuses one that could
    abbreviate two of its own options: --monitor (--monitor-interval, --monitor_interval), which main.py
    therefore also takes as --judge_by. Every other option reaches main.py as it was given."""
    from torch.distributed.run import get_args_parser

    import main

    refused = set()
    for option in sorted(set(re.findall(r"--\w+", main.get_parser().format_help()))):
        for given in ([option, "1"], [f"{option}=1"]):  # as typed, and as W&B's agent writes it
            with contextlib.suppress(SystemExit):
                parsed = get_args_parser().parse_args(["--standalone", "main.py", *given])
                assert parsed.training_script_args == given, given
                continue
            refused.add(option)
    assert refused <= {"--monitor"}, capsys.readouterr().err
    assert main.get_parser().parse_args(["--judge_by", "val/loss"]).monitor == "val/loss"


def wait_for_epochs(out: Path, epochs: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        found = list(out.glob("*/*/results.json"))
        try:
            if found and len(results(out)[1]["history"]) >= epochs:
                return
        except ValueError:  # written as it is read
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the run never got that far"
        time.sleep(0.05)


def test_a_preempted_job_resumes_to_equal_a_job_never_stopped(tiny_data, tmp_path):
    """SIGTERM to every process of the job (SLURM's preemption): every rank stops after the same batch,
    Preempted; `--resume yes` on the same number of ranks equals a job never stopped; on another, it
    goes on, saying that the batches differ."""
    flags = [*EXACT, "--epochs", "4", *SLOW]
    code, _, _ = run(2, small_run(tiny_data, tmp_path / "whole", *flags), tmp_path)
    assert code == 0
    proc = torchrun(2, small_run(tiny_data, tmp_path / "stopped", *flags), tmp_path)
    output = Output(proc)
    wait_for_epochs(tmp_path / "stopped", 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    text, _ = output.finish()
    folder, stopped = results(tmp_path / "stopped")
    assert stopped["tags"] == ["Preempted"] and stopped["status"] == "failed", text
    assert (folder / "checkpoint.pt").exists()
    assert "boilerplate/" not in text and 'main.py", line' not in text, text  # torchrun's own traceback alone
    code, text, _ = run(2, small_run(tiny_data, tmp_path / "stopped", *flags, "--resume", "yes"), tmp_path)
    assert code == 0, text
    (_, whole), (_, resumed) = results(tmp_path / "whole"), results(tmp_path / "stopped")
    assert resumed["tags"] == whole["tags"] == ["Success"]
    assert_same_history(whole["history"], [row for row in resumed["history"] if row["evaluated"]])
    assert_same_weights(weights(results(tmp_path / "whole")[0]), weights(folder))


def test_another_number_of_ranks_goes_on_and_says_so(tiny_data, tmp_path):
    flags = [*EXACT, "--epochs", "3", *SLOW]
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path)
    output = Output(proc)
    wait_for_epochs(tmp_path / "out", 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output.finish()
    code, text, _ = run(1, small_run(tiny_data, tmp_path / "out", *flags, "--resume", "yes"), tmp_path)
    assert code == 0 and "trained by 2 processes and goes on with 1" in text, text
    assert results(tmp_path / "out")[1]["tags"] == ["Success"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_mid_epoch_ends_the_run_crashed(rank, tiny_data, tmp_path):
    """SIGKILL of either rank's training process: the run ends Crashed, its epochs kept, resumable, W&B's
    run Failed with the tag, whichever rank died (rank 0's guard writes it if rank 0 did)."""
    flags = [*EXACT, "--epochs", "50", *SLOW, "--wandb_project", "boilerplate-tests"]
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path)
    output = Output(proc)
    wait_for_epochs(tmp_path / "out", 1, proc)
    # results.json is written before the epoch's checkpoint: a kill between the two is a run whose first
    # checkpoint never came (on the CI's slow machine once), which is not this test's case
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out").glob("*/*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(training_process_of_rank(proc.pid, rank), signal.SIGKILL)
    text, _ = output.finish()
    assert proc.wait() != 0
    folder, res = results(tmp_path / "out")
    assert res["status"] == "failed" and res["tags"] == ["Crashed"], text
    assert res["history"] and (folder / "checkpoint.pt").exists()
    assert "another process of the job died" in text or rank == 0, text
    sittings = find_runs(tmp_path, folder.name)
    assert sittings[-1].exit_code == 1 and sittings[-1].tags == ["Crashed"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_as_the_end_is_written_changes_nothing(rank, tiny_data, tmp_path):
    """Once rank 0 has saved the run's end, a SIGKILL of either rank's training process (while W&B
    finishes, or as it leaves) changes neither the run's end nor the job's exit status."""
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *EXACT, "--wandb_project", "boilerplate-tests"), tmp_path)
    output = Output(proc)
    kill_as_the_end_is_written(tmp_path / "out", training_process_of_rank(proc.pid, rank), proc)
    text, _ = output.finish()
    assert proc.wait() == 0, text
    folder, res = results(tmp_path / "out")
    assert res["status"] == "finished" and res["tags"] == ["Success"], text
    last = find_runs(tmp_path, folder.name)[-1]
    assert last.exit_code == 0 and last.tags == ["Success"]


def rank_1_killed(tmp_path: Path, killing: str, args: list[str]) -> tuple[subprocess.Popen, str, bool]:
    """A 2-rank job of a fork whose rank 1 runs `killing` (code that makes its training process SIGKILL
    itself at a chosen moment) before main(): the job, its output, and whether rank 1's guard warned of the
    kill after its last epoch."""
    code = "if os.environ.get('RANK') == '1':\n" + killing + "\n\n"
    script = fork(tmp_path, ("def main(", code), ("import signal", "import os\n")) / "main.py"
    proc = torchrun(2, args, tmp_path, script=script)
    text, _ = Output(proc).finish()
    warned = "Warning: the training process was killed by SIGKILL" in text and "after its last epoch (rank 1)" in text
    return proc, text, warned


def test_a_rank_killed_after_the_ranks_agreed_on_the_end_leaves_the_end_to_rank_0(tiny_data, tmp_path):
    """Rank 1's training process killed (SIGKILL) after every rank agreed the run had ended and before it
    told its guard so (here, as it begins its part of the end): rank 0 writes the end as if nothing had
    happened, and the job says so: Success, exit 0, rank 1's guard warning of the kill. Until this test the
    guard failed the job (exit 1) for a finished run, seen once in CI as a kill fell in that window."""
    killing = "    from boilerplate import runs\n\n"
    killing += "    runs.Record.finish = lambda *_, **__: os.kill(os.getpid(), signal.SIGKILL)\n"
    args = small_run(tiny_data, tmp_path / "out", *EXACT, "--wandb_project", "boilerplate-tests")
    proc, text, warned = rank_1_killed(tmp_path, killing, args)
    assert proc.wait() == 0 and warned, text
    folder, res = results(tmp_path / "out")
    assert res["status"] == "finished" and res["tags"] == ["Success"], text
    assert [sitting.tags for sitting in find_runs(tmp_path, folder.name)] == [["Success"]]


def test_a_rank_killed_after_its_last_epoch_before_the_ranks_agreed_leaves_a_resumable_end(tiny_data, tmp_path):
    """Rank 1's training process killed (SIGKILL) after its last epoch was saved, before the ranks agreed
    the run had ended (as it begins to ask the others): the end was not decided, so the run ends Crashed,
    exit 1, rank 1's guard warning of the kill; the same command with --resume yes ends it Success without
    training any epoch again (the just-before window of the agreed-end test above)."""
    killing = "    from boilerplate import distributed\n\n"  # as it asks the others at its 2nd and last epoch
    killing += "    agreed, asked = distributed.first, []\n\n"
    killing += "    def killed_at_the_end(tag):\n"
    killing += "        asked.append(tag)\n"
    killing += "        if len(asked) == 2:\n"
    killing += "            os.kill(os.getpid(), signal.SIGKILL)\n"
    killing += "        return agreed(tag)\n\n"
    killing += "    distributed.first = killed_at_the_end\n"
    args = small_run(tiny_data, tmp_path / "out", *EXACT, "--epochs", "2")
    proc, text, warned = rank_1_killed(tmp_path, killing, args)
    assert proc.wait() != 0 and warned, text
    folder, res = results(tmp_path / "out")
    assert (res["status"], res["tags"]) == ("failed", ["Crashed"]) and (folder / "checkpoint.pt").exists(), text
    code, text, _ = run(2, [*args, "--resume", "yes"], tmp_path)
    resumed = results(tmp_path / "out")[1]
    assert code == 0 and resumed["tags"] == ["Success"], text
    assert [row["epoch"] for row in resumed["history"] if row["evaluated"]] == [1, 2], text


@pytest.mark.parametrize("whom", ["every process", "rank 1 alone"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_that_reaches_any_rank_stops_every_rank_after_the_same_batch(signum, whom, tiny_data, tmp_path):
    """A terminal's Ctrl+C, a scheduler's SIGTERM or its warning of the job's end (SIGUSR1, which torchrun
    passes on when told to, as docs/distributed.md says) reach torchrun, which passes them on to every rank;
    `kill` may reach rank 1's training process alone: either way every rank stops together (none waits
    forever for the other), with the tag that signal gives, and the run is resumable."""
    flags = [*EXACT, "--epochs", "50", *SLOW]
    told = ("--signals-to-handle", SIGNALS_TO_HANDLE) if signum == signal.SIGUSR1 else ()
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path, *told)
    output = Output(proc)
    wait_for_epochs(tmp_path / "out", 1, proc)
    if whom == "every process":
        os.killpg(proc.pid, signum)
    else:
        os.kill(training_process_of_rank(proc.pid, 1), signum)
    text, _ = output.finish()
    folder, res = results(tmp_path / "out")
    assert res["tags"] == [{signal.SIGINT: "User abort"}.get(signum, "Preempted")], text
    assert (folder / "checkpoint.pt").exists() and "boilerplate/" not in text, text


@pytest.mark.parametrize("watchdog", ["yes", "no"])
def test_torchrun_killed_stops_every_rank(watchdog, tiny_data, tmp_path):
    """torchrun itself killed (SIGKILL: W&B agent's last resort, local_sweep's second Ctrl+C, `kill -9`)
    mid-run: every rank stops after the same batch, as after a SIGTERM to main.py alone: Stopped, resumable,
    no process left. torchrun starts each rank in a session of its own and stops none as it dies: until
    this test the ranks trained on, unwatched, to their last epoch (50 here)."""
    flags = [*EXACT, "--epochs", "50", *SLOW, "--watchdog", watchdog]
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path)
    output = Output(proc)
    wait_for_epochs(tmp_path / "out", 1, proc)
    tree = descendants(proc.pid)
    proc.kill()
    text, _ = output.finish()  # the ranks share torchrun's output: it ends when they have
    deadline = time.monotonic() + 60
    while not all(ended(pid) for pid in tree):
        assert time.monotonic() < deadline, f"a rank outlived torchrun:\n{text}"
        time.sleep(0.1)
    folder, res = results(tmp_path / "out")
    assert res["status"] == "failed" and res["tags"] == ["Stopped"], text
    assert len(res["history"]) < 50 and (folder / "checkpoint.pt").exists(), text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("watchdog", ["yes", "no"])
def test_a_rank_that_hangs_ends_the_run_timeout(watchdog, tiny_data, tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-epoch: past --epoch_timeout the run ends Timeout, not a job stuck forever:
    its guard kills it (the others see it die after the epoch's deadline), or without guards, the others'
    wait for it ends at the process group's timeout, --epoch_timeout too."""
    flags = [*EXACT, "--epochs", "50", *SLOW, "--epoch_timeout", "0.1", "--watchdog", watchdog]
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path)
    output = Output(proc)
    wait_for_epochs(tmp_path / "out", 1, proc)
    frozen = training_process_of_rank(proc.pid, 1, guarded=watchdog == "yes")
    os.kill(frozen, signal.SIGSTOP)
    deadline = time.monotonic() + 120
    while results(tmp_path / "out")[1]["status"] == "running":
        assert time.monotonic() < deadline, "the job never ended"
        time.sleep(0.1)
    os.kill(frozen, signal.SIGCONT)  # the rank that hung now hears torchrun's SIGTERM: no 30 s wait for its SIGKILL
    text, _ = output.finish()
    folder, res = results(tmp_path / "out")
    assert res["status"] == "failed" and res["tags"] == ["Timeout"], text
    assert res["history"] and (folder / "checkpoint.pt").exists()


def test_rank_0s_start_may_outlast_the_epoch_timeout(tiny_data, wandb_server, tmp_path):
    """--epoch_timeout bounds an epoch, not the start: the other ranks wait for rank 0 while W&B starts (its
    server slow to create the run: 10 s here, past --epoch_timeout's 6; W&B's start may take its limit(),
    100 s) as torch would wait for them, 30 minutes. Until this test the other ranks' first collective
    gave rank 0 up at --epoch_timeout, and the job ended Timeout before its first epoch."""
    wandb_server.slow["UpsertBucket"] = 10
    flags = [*EXACT, "--epoch_timeout", "0.1", "--wandb_project", "boilerplate-tests"]
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path, env=wandb_server.environment())
    text, _ = Output(proc).finish()
    folder, res = results(tmp_path / "out")
    assert proc.wait() == 0 and res["tags"] == ["Success"] and "Traceback" not in text, text
    assert wandb_server.runs[folder.name].tags == ["Success"]


def test_rank_0s_start_refused_ends_the_job_with_its_reason(tiny_data, wandb_server, tmp_path):
    """W&B's server refuses rank 0's run (its entity is denied): the job ends with W&B's reason, nothing trained
    or left, and the other rank, which waited for rank 0, says the run never began (it said "resumable")."""
    wandb_server.denied.add(wandb_server.environment()["WANDB_ENTITY"])
    flags = [*EXACT, "--wandb_project", "boilerplate-tests"]
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path, env=wandb_server.environment())
    text, _ = Output(proc).finish()
    assert proc.wait() == 1 and "Error: W&B's server refused the run (permission denied)" in text, text
    assert "resumable" not in text and not list((tmp_path / "out").rglob("*")) and not wandb_server.runs, text


def free_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def machines(args: list[str], wandb_dir: Path) -> list[subprocess.Popen]:
    """Two machines' way on this one: two torchrun launchers of one rank each, joined by torchrun's c10d
    rendezvous on a free port, as docs/distributed.md's command on each machine joins them. Each launcher is
    in a session of its own, as on a machine of its own."""
    port = free_port()
    rendezvous = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job")
    return [torchrun(1, args, wandb_dir, *rendezvous) for _ in range(2)]


def wait_for_a_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    """Until epoch 1 is saved, its checkpoint too (written after its results.json)."""
    wait_for_epochs(out, 1, proc)
    deadline = time.monotonic() + 60
    while not list(out.glob("*/*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.01)


def lose(nodes: list[subprocess.Popen], outputs: list[Output], rank: int) -> tuple[subprocess.Popen, str]:
    """The machine of `rank` lost: every process of it (its torchrun launcher and all under it) killed at
    once, as a machine goes, none of them seeing another die. The machine kept, and its output to its end."""
    lost = machine_of_rank(nodes, rank)
    tree = [lost.pid, *descendants(lost.pid)]
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    [(kept, output)] = [(node, out) for node, out in zip(nodes, outputs, strict=True) if node is not lost]
    text, _ = output.finish()
    outputs[nodes.index(lost)].finish()
    return kept, text


def ended(pid: int) -> bool:
    """Whether a process has ended (gone, or dead and not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].startswith("Z")
    except OSError:
        return True


def machine_of_rank(nodes: list[subprocess.Popen], rank: int) -> subprocess.Popen:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for node in nodes:
            for guard in children(node.pid, b"main.py"):
                with contextlib.suppress(OSError):
                    if f"RANK={rank}".encode() in Path(f"/proc/{guard}/environ").read_bytes().split(b"\0"):
                        return node
        time.sleep(0.05)
    raise AssertionError(f"no machine runs rank {rank}")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_machine_lost_ends_the_run_crashed_and_the_machines_resume_it(rank, tiny_data, tmp_path):
    """Two machines (torchrun's rendezvous, on this one); every process of one machine killed at once
    mid-run (the machine lost: its launcher, its rank's guard and training process, W&B's service). Rank 1's
    machine lost: rank 0 ends the run Crashed, its epochs kept, resumable. Rank 0's: nothing is left to
    write the run's end (results.json says running, as after a power cut), and rank 1 says the run is
    resumable. Either way the same command with --resume yes on both machines finishes the run."""
    # Ten epochs: on a loaded machine (two hogs beside two tests a core) this test once saw epoch 1's
    # checkpoint only as epoch 3 ended the run, and lost a machine that had nothing left to do.
    epochs = 10
    flags = [*EXACT, "--epochs", str(epochs), *SLOW]
    nodes = machines(small_run(tiny_data, tmp_path / "out", *flags), tmp_path)
    outputs = [Output(node) for node in nodes]
    wait_for_a_checkpoint(tmp_path / "out", nodes[0])
    kept, text = lose(nodes, outputs, rank)
    assert kept.wait() != 0
    folder, res = results(tmp_path / "out")
    assert res["history"] and (folder / "checkpoint.pt").exists(), text
    assert (res["status"], res["tags"]) == (("running", []) if rank == 0 else ("failed", ["Crashed"])), text
    assert "another process of the job died" in text and "resumable" in text and "boilerplate/" not in text, text
    nodes = machines(small_run(tiny_data, tmp_path / "out", *flags, "--resume", "yes"), tmp_path)
    texts = [Output(node).finish()[0] for node in nodes]
    assert [node.wait() for node in nodes] == [0, 0], texts
    resumed = results(tmp_path / "out")[1]
    evaluated = [row["epoch"] for row in resumed["history"] if row["evaluated"]]
    assert resumed["tags"] == ["Success"] and evaluated == list(range(1, epochs + 1)), texts


@pytest.mark.parametrize("rank", [0, 1])
def test_a_machine_that_stops_answering_ends_the_run_timeout(rank, tiny_data, tmp_path):
    """Two machines (torchrun's rendezvous, on this one); every process of one machine frozen at once mid-run
    (SIGSTOP), as the others meet a machine cut off the network: its connections open, nothing coming back.
    Past --epoch_timeout the other machine's rank gives it up, not a job stuck forever: rank 1's frozen,
    rank 0 ends the run Timeout; rank 0's, rank 1 says the run is resumable and leaves its end to rank 0,
    which writes it when its machine comes back (SIGCONT): Timeout, or Crashed when let go between epochs.
    Either way the run keeps its epochs."""
    flags = [*EXACT, "--epochs", "50", *SLOW, "--epoch_timeout", "0.1"]
    nodes = machines(small_run(tiny_data, tmp_path / "out", *flags), tmp_path)
    outputs = [Output(node) for node in nodes]
    wait_for_epochs(tmp_path / "out", 1, nodes[0])
    frozen = machine_of_rank(nodes, rank)
    [(kept, output)] = [(node, out) for node, out in zip(nodes, outputs, strict=True) if node is not frozen]
    [guard] = children(kept.pid, b"main.py")  # the other rank's: its end is the rank's, not torchrun's
    tree = [frozen.pid, *descendants(frozen.pid)]
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 120
        while not ended(guard):
            assert time.monotonic() < deadline, f"the other rank never gave the frozen machine up:\n{output}"
            time.sleep(0.1)
        res = results(tmp_path / "out")[1]
        assert (res["status"], res["tags"]) == (("running", []) if rank == 0 else ("failed", ["Timeout"])), output
    finally:  # torchrun's own launcher beside it may wait on its rendezvous store, kept by the frozen machine
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
    text, _ = output.finish()
    assert kept.wait() != 0
    assert "did not answer in time" in text and "resumable" in text and "boilerplate/" not in text, text
    text, _ = outputs[nodes.index(frozen)].finish()
    assert frozen.wait() != 0
    folder, res = results(tmp_path / "out")
    # Rank 0 let go between epochs meets the other rank gone at once, in an epoch of its own: Crashed
    assert res["status"] == "failed" and res["tags"] in [["Timeout"], *([["Crashed"]] if rank == 0 else [])], text
    assert res["history"] and (folder / "checkpoint.pt").exists(), text


def test_a_job_torchrun_restarts_continues_its_run(tiny_data, tmp_path):
    """torchrun --max-restarts 1, rank 1's training process killed after epoch 1: torchrun starts every rank
    again, and the job continues the run it left from its checkpoint, as torch asks of a restarted script:
    one run, each epoch once, Success, exit 0. Until this test the restart trained a second run from scratch
    beside the Crashed one. (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it torch's restarted ranks may
    read their predecessors' addresses and fail to join, pytorch/pytorch#135712.)"""
    flags = [*EXACT, "--epochs", "3", *SLOW, "--wandb_project", "boilerplate-tests"]
    restarts = ("--max-restarts", "1")
    proc = torchrun(2, small_run(tiny_data, tmp_path / "out", *flags), tmp_path, *restarts, env=NO_STALE_STORE)
    output = Output(proc)
    wait_for_a_checkpoint(tmp_path / "out", proc)
    os.kill(training_process_of_rank(proc.pid, 1), signal.SIGKILL)
    text, _ = output.finish()
    assert (
        proc.wait() == 0 and "torchrun restarted the job (1 of 1 restarts): it continues the run it stopped" in text
    ), text
    [folder] = list((tmp_path / "out").glob("*/*/"))
    res = results(tmp_path / "out")[1]
    assert res["tags"] == ["Success"] and [row["epoch"] for row in res["history"] if row["evaluated"]] == [1, 2, 3]
    assert [sitting.tags for sitting in find_runs(tmp_path, folder.name)] == [["Crashed"], ["Success"]]


# A fork's loss that pauses while the job has one process: 75 batches an epoch, 12 epochs alone take 100 s
ALONE_CRAWLS = """import os
import time

_loss_of = loss_of


def loss_of(logits, labels, args):
    if os.environ.get("WORLD_SIZE") == "1":
        time.sleep(0.1)
    return _loss_of(logits, labels, args)


"""


def test_a_machine_that_joins_an_elastic_job_continues_its_run(tiny_data, tmp_path):
    """An elastic job (--nnodes 1:2): one machine trains alone; a second joins after epoch 1, and torchrun
    stops the first's rank (SIGTERM) and starts one on each machine, its restart count still 0. The job
    continues its run with two ranks: one run, each epoch once, Success, exit 0 on both machines. Until this
    test the join ended the run Preempted and the job trained a second one from scratch beside it. The rank
    alone crawls (a fork: a pause each batch), so that the second machine joins before the run's end however
    long it takes to start on a busy machine; on CI it once came after the 12 epochs."""
    flags = [*EXACT, "--epochs", "12", *SLOW, "--wandb_project", "boilerplate-tests"]
    args, port = small_run(tiny_data, tmp_path / "out", *flags), free_port()
    endpoint = ("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job-{port}")
    elastic = ("--nnodes", "1:2", *endpoint, "--rdzv-conf", "last_call_timeout=1")
    script = fork(tmp_path, ("def main(", ALONE_CRAWLS)) / "main.py"
    first = torchrun(1, args, tmp_path, *elastic, env=NO_STALE_STORE, script=script)
    output = Output(first)
    wait_for_epochs(tmp_path / "out", 1, first)
    second = torchrun(1, args, tmp_path, *elastic, env=NO_STALE_STORE, script=script)
    texts = [output.finish()[0], Output(second).finish()[0]]
    assert [first.wait(), second.wait()] == [0, 0], texts
    assert f"torchrun started job job-{port} again" in "".join(texts), texts
    [folder] = list((tmp_path / "out").glob("*/*/"))
    res = results(tmp_path / "out")[1]
    assert res["tags"] == ["Success"] and [row["epoch"] for row in res["history"] if row["evaluated"]] == list(
        range(1, 13)
    )
    assert [sitting.tags for sitting in find_runs(tmp_path, folder.name)] == [["Preempted"], ["Success"]]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_machine_that_leaves_an_elastic_job_leaves_its_run_to_the_others(rank, tiny_data, tmp_path):
    """An elastic job (--nnodes 1:2, --max-restarts) on two machines; every process of one killed at once
    after epoch 1 (the machine lost). torchrun restarts the machine left, and the job continues its run on
    it, whichever rank the lost machine ran: one run, each epoch once, Success, exit 0. Rank 0's lost, the
    run's end was never written (results.json says running): it is found all the same. The rendezvous is
    kept apart from both machines (a store held by the test, as by a host outside the job or etcd): the
    machine that holds it is one torchrun cannot lose (docs/distributed.md)."""
    flags = [*EXACT, "--epochs", "6", *SLOW, "--wandb_project", "boilerplate-tests"]
    args, port = small_run(tiny_data, tmp_path / "out", *flags), free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True)  # noqa: F841 (held)
    endpoint = ("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job-{port}")
    conf = ("--rdzv-conf", "is_host=false,last_call_timeout=1")
    elastic = ("--nnodes", "1:2", *endpoint, *conf, "--max-restarts", "1")
    nodes = [torchrun(1, args, tmp_path, *elastic, env=NO_STALE_STORE) for _ in range(2)]
    outputs = [Output(node) for node in nodes]
    wait_for_a_checkpoint(tmp_path / "out", nodes[0])
    kept, text = lose(nodes, outputs, rank)
    assert kept.wait() == 0 and "torchrun restarted the job (1 of 1 restarts): it continues" in text, text
    [folder] = list((tmp_path / "out").glob("*/*/"))
    res = results(tmp_path / "out")[1]
    assert res["tags"] == ["Success"] and [row["epoch"] for row in res["history"] if row["evaluated"]] == list(
        range(1, 7)
    ), text
    assert [sitting.tags for sitting in find_runs(tmp_path, folder.name)][-1] == ["Success"]


@pytest.mark.parametrize("restarted", [False, True])
def test_a_rank_that_cannot_join_the_job_says_so_without_a_traceback(restarted, tiny_data, tmp_path):
    """A rank whose job's address answers nothing (torchrun's variables set by hand, or by a scheduler, with
    no job there): a start error, exit 1, no traceback (until this test, a traceback). Restarted by torchrun,
    it names the variable that avoids torch's own fault there."""
    port = free_port()  # nothing listens there
    alone = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if restarted:
        alone |= {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    proc = torchrun(1, small_run(tiny_data, tmp_path / "out", "--epoch_timeout", "0.05"), tmp_path, env=alone)
    text, _ = Output(proc).finish()
    assert proc.wait() == 1 and "Error: could not join the other processes of the job" in text, text
    assert "Traceback" not in text and not list((tmp_path / "out").glob("*/*")), text
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text) == restarted, text


def test_a_batch_that_leaves_a_rank_without_samples_is_a_usage_error(tiny_data, tmp_path):
    """2 ranks, --batch_size 1: rank 1 would have no sample in any batch (its loss a mean of nothing, NaN).
    Every rank says why, with the usage errors' exit status; nothing is trained, no folder is left."""
    code, text, _ = run(2, small_run(tiny_data, tmp_path / "out", "--batch_size", "1"), tmp_path)
    assert code != 0 and "argument --batch_size: 1 leaves a rank with no sample in a batch" in text, text
    assert "exitcode: 2" in text and "boilerplate/" not in text, text
    assert not list((tmp_path / "out").glob("*/*"))
