"""Fault injection on real `python main.py` processes: real signals at several points of a run, a NaN
in the weights, W&B unreachable. After each: the tags, the status, results.json whole, W&B's record.

Points: "first epoch" (the first epoch's batch bar has appeared), "between epochs" (an epoch's summary
line has just been printed: the training process is saving results.json and its checkpoint),
and "evaluation" (the second epoch's batch bar has just been cleared: its training is over and, on this
data, evaluation takes about as long as training, so the signal lands in it or near it). Each point is
seen in the run's own output, never timed, so a machine that is slow at one moment and fast the next
moves nothing.
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import demo
import main
from conftest import (
    OFFLINE,
    Output,
    epoch_rows,
    group_of,
    parse,
    results,
    small_run,
    start_main,
    training_process,
    wandb_epochs,
    whole_epochs,
    without_times,
)
from wandb_file import find_runs, whole_run
from wandb_server import WandbServer

EPOCHS = 4


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory) -> Path:
    """Easy digits with a large test set, so that evaluation takes a good share of each epoch."""
    return demo.write_dataset(tmp_path_factory.mktemp("faults"), train=1500, test=16000, seed=1)


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return small_run(
        data, out, *demo.SLOW, "--epochs", str(EPOCHS), "--wandb_project", "boilerplate-tests", "--verbose", "2", *extra
    )


def launch(argv: list[str], wandb_dir: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """main.py with W&B offline into `wandb_dir`, its output on stdout with its errors."""
    return start_main(
        argv,
        cwd=wandb_dir,
        env={**OFFLINE, "WANDB_DIR": str(wandb_dir), **(env or {})},
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def run(argv: list[str], wandb_dir: Path, env: dict | None = None, **kwargs) -> tuple[int, str]:
    proc = launch(argv, wandb_dir, env, **kwargs)
    output, _ = Output(proc).finish(300)
    return proc.returncode, output


@pytest.fixture(scope="module")
def uninterrupted(fault_data, tmp_path_factory) -> tuple[dict, dict]:
    """The run as it goes when nothing happens to it: results and weights."""
    base = tmp_path_factory.mktemp("uninterrupted")
    code, output = run(args(fault_data, base / "out"), base)
    assert code == 0, output
    folder, res = results(base / "out")
    return res, torch.load(folder / "model.pt")


def inject(output: Output, signum: int, point: str, to_training: bool) -> int:
    """Wait for `point` in the run's output, then send `signum`; returns the epochs seen finished."""
    if point == "first epoch":
        output.wait_for(lambda line: "batches:" in line)
        time.sleep(0.1)
    else:
        output.wait_for(lambda line: line.startswith("epoch ") and f"/{EPOCHS}" in line)
        if point == "evaluation":  # tqdm clears a finished bar (leave=False) with spaces and "cursor up"
            output.wait_for(lambda line: line.strip(" \n") == "\x1b[A")
    if to_training:
        os.kill(training_process(output.proc.pid), signum)
    else:
        os.killpg(output.proc.pid, signum)  # a terminal's Ctrl+C, a scheduler's SIGTERM: the whole process group
    return int(point != "first epoch")


POINTS = ("first epoch", "between epochs", "evaluation")
EXPECTED = {
    signal.SIGINT: "User abort",
    signal.SIGTERM: "Preempted",
    signal.SIGKILL: "Crashed",
    signal.SIGSEGV: "Crashed",
}


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("signum", list(EXPECTED), ids=lambda s: signal.Signals(s).name)
def test_a_signal_ends_the_run_with_its_tag_and_loses_nothing(signum, point, fault_data, uninterrupted, tmp_path):
    expected_res, expected_model = uninterrupted
    to_training = signum in (signal.SIGKILL, signal.SIGSEGV)  # these kill the process that trains
    proc = launch(args(fault_data, tmp_path / "out"), tmp_path)
    try:
        output = Output(proc)
        finished_before = inject(output, signum, point, to_training)
        output, _ = output.finish(120)
    finally:
        proc.kill()
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    folder, res = results(tmp_path / "out")
    tag = EXPECTED[signum]
    assert res["status"] == "failed" and tag in res["tags"] and "Success" not in res["tags"], res["tags"]
    history = res["history"]
    whole = [r for r in history if r["evaluated"]]  # epochs trained to their end and evaluated
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    assert len(whole) >= finished_before  # no finished epoch lost
    assert without_times(whole) == without_times(expected_res["history"][: len(whole)])
    # A killed training process cannot end its W&B run: the guard re-opens it by its id to end it (offline,
    # in a second sitting); either way W&B holds every epoch results.json does.
    wandb_run = whole_run(tmp_path, folder.name)
    assert wandb_run.exit_code == 1 and tag in wandb_run.tags
    assert wandb_epochs(wandb_run.history) == whole_epochs(history)
    assert wandb_run.preempting == (signum == signal.SIGTERM)
    if to_training:  # the reason is on screen, and where a W&B user looks: the summary (and the Logs tab)
        assert f"killed by {signal.Signals(signum).name}" in output
        assert f"killed by {signal.Signals(signum).name}" in wandb_run.summary["end"]
    if signum != signal.SIGTERM:
        return

    # Preempted: the epoch under way was dropped; resuming continues the same run to the very same end.
    assert all(r["evaluated"] for r in history) and (folder / "checkpoint.pt").exists() == bool(history)
    code, output = run(args(fault_data, tmp_path / "out", "--resume", "yes"), tmp_path)
    assert code == 0 and "Resuming the run in" in output, output
    resumed_folder, res = results(tmp_path / "out")
    assert resumed_folder == folder and res["status"] == "finished" and res["tags"] == expected_res["tags"]
    assert without_times(res["history"]) == without_times(expected_res["history"])
    model = torch.load(folder / "model.pt")
    assert all(torch.equal(model[k], expected_model[k]) for k in expected_model)
    assert not (folder / "checkpoint.pt").exists()
    first, second = find_runs(tmp_path, folder.name)  # one W&B run (one id), written in two sittings offline
    assert len(epoch_rows(first.history)) + len(epoch_rows(second.history)) == EPOCHS and second.exit_code == 0
    assert second.tags == res["tags"]


@pytest.mark.parametrize("stop", ["SIGINT", "SIGKILL", "Timeout"])
def test_after_a_stop_and_a_resume_wandb_holds_each_epoch_once(stop, fault_data, uninterrupted, tmp_path):
    """W&B cannot overwrite a step: an epoch cut short (Ctrl+C or a timeout mid-epoch) must not be in
    its history, or the resumed run, which trains that epoch again whole, would log it twice."""
    argv = args(fault_data, tmp_path / "out")
    if stop == "Timeout":  # every epoch outlasts the limit (0.05 s, a sixth of one here): nothing is whole
        code, output = run([*argv, "--epoch_timeout", str(0.05 / 60)], tmp_path)
        assert code == 1 and "Timeout" in results(tmp_path / "out")[1]["tags"], output
    else:
        proc = launch(argv, tmp_path)
        try:
            output = Output(proc)
            # Ctrl+C mid-epoch leaves a cut-short row; SIGKILL of the training process, none
            inject(
                output, getattr(signal, stop), "first epoch" if stop == "SIGINT" else "evaluation", stop == "SIGKILL"
            )
            output.finish(120)
        finally:
            proc.kill()
    code, output = run([*argv, "--resume", "yes"], tmp_path)  # --epoch_timeout is not a hyper-parameter
    assert code == 0 and "Resuming the run in" in output, output
    folder, res = results(tmp_path / "out")
    wandb_run = whole_run(tmp_path, folder.name)  # every sitting of the run, as W&B's server joins them
    assert wandb_epochs(wandb_run.history) == [row["epoch"] for row in res["history"]] == [1, 2, 3, 4]
    assert wandb_run.step_metrics["train/*"] == wandb_run.step_metrics["test/*"] == "epoch"


def preempted_after_an_epoch(argv: list[str], wandb_dir: Path) -> None:
    """Run main.py until an epoch has ended, then preempt it: a resumable run with a checkpoint."""
    proc = launch(argv, wandb_dir)
    try:
        output = Output(proc)
        inject(output, signal.SIGTERM, "between epochs", False)
        output.finish(120)
    finally:
        proc.kill()


def preempted_at(argv: list[str], wandb_dir: Path, line: str) -> None:
    """Run main.py until it prints a line beginning so, then preempt it (SIGTERM to the job)."""
    proc = launch(argv, wandb_dir)
    try:
        output = Output(proc)
        output.wait_for(lambda text: text.startswith(line))
        os.killpg(proc.pid, signal.SIGTERM)
        output.finish(120)
    finally:
        proc.kill()


def resumed_for_an_epoch(argv: list[str], wandb_dir: Path) -> str:
    """`main.py ARGV --resume yes` until it has trained an epoch, then Ctrl+C; what it printed."""
    proc = launch([*argv, "--resume", "yes"], wandb_dir)
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch "))
        os.killpg(proc.pid, signal.SIGINT)
        return output.finish()[0]
    finally:
        proc.kill()


def test_a_nan_in_the_weights_mid_run_is_caught_before_any_step(fault_data, tmp_path):
    preempted_after_an_epoch(args(fault_data, tmp_path / "out"), tmp_path)
    folder, before = results(tmp_path / "out")
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    model = state["stateful"]["model"]
    weight = next(key for key in model if key.endswith("weight"))
    model[weight].view(-1)[0] = float("nan")  # the fault: a NaN in the weights, mid-run
    torch.save(state, folder / "checkpoint.pt")
    code, output = run(args(fault_data, tmp_path / "out", "--resume", "yes"), tmp_path)
    assert code == 1 and "Traceback" not in output
    _, res = results(tmp_path / "out")
    assert res["status"] == "failed" and "NaN loss" in res["tags"]
    assert without_times(res["history"][: len(before["history"])]) == without_times(before["history"])
    assert res["history"][-1]["train/batches"] == 1  # stopped at the first batch, before its step


def test_a_run_has_one_owner_two_resumes_at_once_never_train_it_twice(tiny_data, tmp_path):
    argv = small_run(tiny_data, tmp_path / "out", "--epochs", "100000", "--verbose", "1")
    proc = launch(argv, tmp_path)
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 1/"))
        os.killpg(proc.pid, signal.SIGTERM)  # preempted: a run to resume
        output.finish(120)
        first = launch([*argv, "--resume", "yes"], tmp_path)  # a job script submitted twice
        first_output = Output(first)
        first_output.wait_for(lambda line: line.startswith("epoch 3/"))
        second = launch([*argv, "--resume", "yes"], tmp_path)
        second_output, _ = Output(second).finish(60)  # a second owner would train on and time out here
        assert second.returncode == 1 and "is being trained by another process" in second_output, second_output
        assert "Traceback" not in second_output
        assert "epoch " not in second_output
        os.killpg(first.pid, signal.SIGKILL)  # its owner dies: the OS releases the run
        first_output.finish(60)
        third = launch([*argv, "--resume", "yes"], tmp_path)
        third_output = Output(third)
        third_output.wait_for(lambda line: line.startswith("epoch "))
        os.killpg(third.pid, signal.SIGINT)
        third_output.finish(120)
    finally:
        for p in (proc, locals().get("first"), locals().get("second"), locals().get("third")):
            if p and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert "Resuming the run in" in str(third_output) and third.returncode == 1
    _, res = results(tmp_path / "out")
    epochs = [row["epoch"] for row in res["history"]]
    assert epochs == list(range(1, len(epochs) + 1)) and res["tags"][-1] == "User abort"


@pytest.fixture
def full_disk(tmp_path):
    """make(kib) -> (folder, preexec): a folder on a tmpfs of that size, a real full disk, where this
    machine lets a test mount one; else a plain folder, and a preexec_fn that limits main.py's files to
    that size (RLIMIT_FSIZE: EFBIG instead of ENOSPC, the same path through the code). TEST_NO_MOUNT=1
    takes the second way where mounting works too."""
    mounted = []

    def make(kib: int):
        folder = tmp_path / f"disk{kib}"
        folder.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)]
        if not os.environ.get("TEST_NO_MOUNT") and subprocess.run(mount, capture_output=True).returncode == 0:
            mounted.append(folder)
            return folder, None

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))

        return folder, limit

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def weights_kib(data: Path) -> float:
    """The size of the small run's weights (its model.pt), from the seams: a fork's model sizes the disks."""
    args = parse(*small_run(data, Path("unused")))
    model = main.build_model(args, main.load_data(args))
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1024


@pytest.mark.parametrize(
    "what, weights, extra",
    [
        # A checkpoint holds the weights and Adam's two moments: three times the weights, and half of that does
        # not fit. model.pt is the weights alone. The disk holds config.json and results.json either way.
        ("checkpoint.pt", 1.5, []),  # the first checkpoint does not fit (best.pt, the weights, does)
        ("best.pt", 0.5, ["--checkpoint_every", "0"]),  # the first best epoch's weights do not fit
        # Without a best epoch (--monitor none, no best.pt):
        ("results.json", None, ["--checkpoint_every", "0", "--monitor", "none"]),  # it outgrows the disk (24 KiB)
        ("model.pt", 0.5, ["--checkpoint_every", "0", "--epochs", "2", "--monitor", "none"]),  # the last file
    ],
)
def test_a_full_disk_ends_the_run_with_its_cause_and_keeps_what_was_saved(
    what, weights, extra, tiny_data, full_disk, tmp_path
):
    if weights and weights * weights_kib(tiny_data) < 24:  # a fork's small model: its file fits beside the JSON
        pytest.skip(f"the model's weights ({weights_kib(tiny_data):.1f} KiB) fit where the run's JSON files do")
    disk, limit = full_disk(max(24, int(weights * weights_kib(tiny_data))) if weights else 24)
    # Under a file-size limit W&B's own files would break too: W&B is checked on a real full disk only.
    wandb = ["--wandb_project", "boilerplate-tests"] if limit is None else []
    argv = small_run(tiny_data, disk, "--epochs", "100", "--verbose", "1", *wandb, *extra)  # extra's --epochs wins
    code, output = run(argv, tmp_path, preexec_fn=limit)
    assert code == 1 and "Traceback" not in output, output
    assert f"Error: could not write {disk}" in output and f"/{what} (" in output
    folder, res = results(disk)  # parses: the last good one
    assert res["history"] and [r["epoch"] for r in res["history"]] == list(range(1, len(res["history"]) + 1))
    if what != "results.json":  # results.json itself could be written to its end
        assert res["status"] == "failed" and res["tags"][-1] == "Save failed"
        assert len(res["history"]) == (2 if what == "model.pt" else 1)
    if wandb:
        wandb_run = find_runs(tmp_path, folder.name)[-1]
        assert wandb_run.exit_code == 1 and "Save failed" in wandb_run.tags
        assert "could not write" in wandb_run.summary["end"]


def filled(folder: Path) -> None:
    """Fills the disk under `folder` to its last block, as another job's files would."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as filler:
        while True:
            filler.write(bytes(4096))


@pytest.mark.parametrize("folder", ["WANDB_DIR", "./wandb", "--output_path", "W&B disabled"])
def test_a_full_disk_where_the_run_writes_is_a_clear_error_before_the_data_loads(
    folder, tiny_data, full_disk, tmp_path
):
    """W&B's service writes its run file to a full disk without a word to the run: the run ended `Success`
    with an empty W&B run file, and W&B's advice to `wandb sync` it. Now the start says so, before the data
    loads: exit 1, nothing trained. W&B's folder is WANDB_DIR, or ./wandb where the run starts. A full
    --output_path, which took an empty file, failed only at the first epoch's save. W&B's disabled mode
    writes nothing: its run trains on."""
    disk, limit = full_disk(64)
    if limit is not None:
        pytest.skip("a full disk needs a tmpfs this machine lets the test mount")
    filled(disk)
    out = disk / "out" if folder == "--output_path" else tmp_path / "out"
    if folder == "--output_path":
        out.mkdir()  # a folder takes no block
    argv = small_run(tiny_data, out, "--verbose", "1", "--wandb_project", "boilerplate-tests")
    wandb_dir = tmp_path if folder == "--output_path" else disk  # main.py starts there; W&B writes there
    env = {"./wandb": {"WANDB_DIR": ""}, "W&B disabled": {"WANDB_DIR": "", "WANDB_MODE": "disabled"}}.get(folder)
    code, output = run(argv, wandb_dir, env)
    if folder == "W&B disabled":
        assert code == 0 and "Tags: Success" in output and "Traceback" not in output, output
        return
    said = {
        "WANDB_DIR": f"cannot save under WANDB_DIR {disk}",
        "./wandb": f"no room for W&B's run in {disk}/wandb",
        "--output_path": f"cannot save under --output_path {out}",
    }[folder]
    assert code == 1 and f"Error: {said}" in output and "No space left on device" in output, output
    assert "Traceback" not in output and "epoch" not in output and not list(out.rglob("*.json")), output


def test_a_disk_that_fills_under_wandbs_folder_mid_run_is_said_at_the_end(tiny_data, full_disk, tmp_path):
    """Another job fills the disk of W&B's folder mid-run: W&B keeps only part of the run there, and says so
    only in its own debug log. The run trains to its end (results.json is elsewhere), and says that W&B's
    local record is likely incomplete, naming the disk's state, not a dead service."""
    disk, limit = full_disk(2048)
    if limit is not None:
        pytest.skip("a full disk needs a tmpfs this machine lets the test mount")
    out = tmp_path / "out"
    proc = launch(small_run(tiny_data, out, "--verbose", "1", "--epochs", "20", "--wandb_project", "p"), disk)
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 2/"))
        filled(disk)
        text, _ = output.finish(300)
    finally:
        proc.kill()
    folder, res = results(out)
    assert proc.returncode == 0 and res["status"] == "finished" and len(res["history"]) == 20, text
    assert "no room left" in text and "its service has probably died" not in text, text


def test_a_run_folder_that_cannot_be_made_is_a_clear_start_error(tiny_data, tmp_path):
    out = tmp_path / "out"
    group = out / group_of(vars(parse(*small_run(tiny_data, out))))
    out.mkdir()
    group.write_text("not a folder")  # where the run's group folder must go
    code, output = run(small_run(tiny_data, out, "--verbose", "1"), tmp_path)
    assert code == 1 and "Traceback" not in output and f"cannot make the run folder {group}/" in output, output


class Payload:
    """What a pickled checkpoint can carry: code that runs as it loads (here, it leaves a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_not_plain_data_damaged_or_another_models_is_refused_and_nothing_lost(tiny_data, tmp_path):
    argv = small_run(tiny_data, tmp_path / "out", "--epochs", str(EPOCHS), "--verbose", "1")
    preempted_after_an_epoch(argv, tmp_path)
    folder, before = results(tmp_path / "out")
    checkpoint, marker = folder / "checkpoint.pt", tmp_path / "the-payload-ran"
    good = checkpoint.read_bytes()
    state = torch.load(checkpoint)
    model = state["stateful"]["model"]
    weight = next(key for key in model if key.endswith("weight"))
    another = {**state["stateful"], "model": {**model, weight: torch.zeros(3, 7)}}  # another model's weights
    torch.save({**state, "stateful": another}, checkpoint)
    other_model = checkpoint.read_bytes()
    torch.save({**state, "history": Payload(marker)}, checkpoint)
    cases = [  # (the checkpoint's bytes, what the message must say)
        (checkpoint.read_bytes(), "holds more than tensors and plain values (it calls posix.system)"),
        (other_model, "could not be loaded (RuntimeError: Error(s) in loading state_dict"),  # another --hidden's
        (good[: len(good) // 2], "could not be loaded"),  # truncated, as by a full disk or a killed copy
        (b"", "could not be loaded"),
    ]
    for content, message in cases:
        checkpoint.write_bytes(content)
        code, output = run([*argv, "--resume", "yes"], tmp_path)
        assert code == 1 and f"Error: the checkpoint {checkpoint}" in output and message in output, output
        assert "Traceback" not in output and "--resume yes" not in output
        assert not marker.exists() and results(tmp_path / "out") == (folder, before)  # nothing ran, nothing lost


@pytest.mark.parametrize("down", ["refused", "503"])
def test_wandb_unreachable_online_logs_offline_and_loses_nothing(tmp_path, down):
    data = demo.write_dataset(tmp_path / "data")
    # W&B would retry the refused connection (or a gateway's 503 in an outage) until its init timeout, here
    # 600 s (longer than the test may take): the run asks the server once before wandb.init, and trains
    # offline at once.
    gateway = WandbServer()
    gateway.outage = 503
    url = "http://127.0.0.1:9" if down == "refused" else gateway.url
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": url, "WANDB_INIT_TIMEOUT": "600"}
    start = time.monotonic()
    try:
        code, output = run(
            small_run(data, tmp_path / "out", "--wandb_project", "boilerplate-tests", "--verbose", "1"), tmp_path, env
        )
    finally:
        gateway.close()
    assert code == 0 and f"{url} is unreachable" in output and "logging offline" in output, output
    assert time.monotonic() - start < 120  # a 1-second run; waiting for W&B would have held it 600 s
    folder, res = results(tmp_path / "out")
    assert res["status"] == "finished" and len(res["history"]) == 2
    [offline] = find_runs(tmp_path, folder.name, prefix="offline-run")
    assert offline.exit_code == 0 and len(epoch_rows(offline.history)) == 2 and offline.tags == ["Success"]


def test_bad_data_or_output_path_is_a_clear_error_before_training(tmp_path):
    data = demo.write_dataset(tmp_path / "data")
    broken = shutil.copytree(data, tmp_path / "broken")
    demo.damage(broken, "test")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    labels = shutil.copytree(data, tmp_path / "labels")
    demo.label_beyond_the_classes(labels)
    cases = [  # (data, output path, exit status, what the message must say, more arguments)
        (broken, tmp_path / "out1", 1, "could not be read", []),
        (data, blocker / "out", 1, "--output_path", []),
        (data, tmp_path / "out3", 2, "argument --val_size", ["--val_size", "600"]),
        (labels, tmp_path / "out4", 1, f"outside the data's {demo.CLASSES} classes", []),
        (data, tmp_path / "out5", 1, "could not be built on cpu (RuntimeError: ", demo.HUGE_MODEL),
        (data, tmp_path / "out6", 2, "argument --seed", ["--seed", str(2**63)]),
        (data, tmp_path / "out7", 2, "argument --epochs", ["--epochs", "10000000000000000000000"]),
        (data, tmp_path / "out8", 2, "argument --lr: expected a finite", ["--lr", "inf"]),
        (data, tmp_path / "out9", 2, "unrecognized arguments: --hid", ["--hid", "32"]),
    ]
    for folder, out, status, message, extra in cases:
        code, output = run(small_run(folder, out, "--verbose", "1", *extra), tmp_path)
        assert code == status and message in output and "Traceback" not in output, output
        assert "epoch 1/" not in output and not (out.exists() and list(out.rglob("*")))  # not even a folder


def test_resume_names_a_run_it_skips_for_a_damaged_results_file(tiny_data, tmp_path):
    argv = small_run(tiny_data, tmp_path / "out", "--verbose", "1", "--epochs", "100000")
    preempted_at(argv, tmp_path, "epoch 1/")  # the run to resume
    folder, _ = results(tmp_path / "out")
    (folder.parent / "damaged1").mkdir()
    (folder.parent / "damaged1" / "results.json").write_text('{"history": [')  # cut short, as by a full disk
    text = resumed_for_an_epoch(argv, tmp_path)
    assert f"--resume skipped the run in {folder.parent / 'damaged1'}" in text, text
    assert f"Resuming the run in {folder}" in text and "Traceback" not in text


def test_a_training_process_stuck_past_the_epoch_timeout_is_killed(fault_data, tmp_path):
    # SIGSTOP: the training process stops dead, as if stuck inside one native call; the loop's own
    # check between batches never runs.
    proc = launch(args(fault_data, tmp_path / "out", "--epoch_timeout", "0.1"), tmp_path)
    try:
        output = Output(proc)
        finished_before = inject(output, signal.SIGSTOP, "between epochs", True)
        output, _ = output.finish(60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in output, output
    assert "stuck" in output and "--epoch_timeout 0.1 min" in output
    folder, res = results(tmp_path / "out")
    assert res["status"] == "failed" and "Timeout" in res["tags"] and len(res["history"]) >= finished_before
    wandb_run = whole_run(tmp_path, folder.name)
    assert wandb_run.exit_code == 1 and "Timeout" in wandb_run.tags
    assert wandb_epochs(wandb_run.history) == whole_epochs(res["history"])


def test_a_job_suspended_past_the_epoch_timeout_goes_on_when_it_resumes(tiny_data, tmp_path):
    """SIGSTOP to the whole job, then SIGCONT (Ctrl+Z then fg; SLURM's suspend and gang scheduling): it stood
    still longer than --epoch_timeout, and nothing hung. The run trains on to its end, Success: the time
    suspended counts for neither the loop's check nor the guard's. Before, it ended Timeout as it resumed."""
    out = tmp_path / "out"
    argv = small_run(tiny_data, out, *demo.SLOW, "--epochs", "4", "--epoch_timeout", "0.1", "--verbose", "1")
    proc = launch([*argv, "--wandb_project", "boilerplate-tests"], tmp_path)
    try:
        output = Output(proc)
        output.wait_for(lambda line: line.startswith("epoch 1/"))
        time.sleep(0.2)  # into the second epoch's batches, where the loop checks the time
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(10)  # longer than the 6 s --epoch_timeout allows, and the guard's 2 s of grace after it
        os.killpg(proc.pid, signal.SIGCONT)
        text, _ = output.finish()
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in text, text
    folder, res = results(out)
    assert res["status"] == "finished" and res["tags"][0] == "Success" and len(res["history"]) == 4, text
    assert whole_run(tmp_path, folder.name).exit_code == 0


def test_a_preempted_sweep_run_resumes_by_itself_when_wandb_requeues_it(fault_data, uninterrupted, tmp_path):
    # W&B's agent starts a re-queued run again with its own run id (WANDB_RUN_ID) and no new flag.
    expected_res, expected_model = uninterrupted
    agent = {"WANDB_SWEEP_ID": "sweep123", "WANDB_RUN_ID": "preempted1", "WANDB_PROJECT": "boilerplate-tests"}
    argv = [a for a in args(fault_data, tmp_path / "out") if a not in ("--wandb_project", "boilerplate-tests")]
    proc = launch(argv, tmp_path, agent)
    try:
        output = Output(proc)
        inject(output, signal.SIGTERM, "between epochs", False)
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


def test_resume_yes_is_idempotent_and_resumes_the_stopped_run_beside_a_live_copy(tiny_data, tmp_path):
    """Re-running a job array with --resume yes trains only what is missing: a finished run is reported and
    left alone; a stopped one is resumed, even while another copy of the same command trains a run of its own."""
    done = small_run(tiny_data, tmp_path / "done", "--verbose", "1")
    assert run(done, tmp_path)[0] == 0
    folder, finished = results(tmp_path / "done")
    code, output = run([*done, "--resume", "yes"], tmp_path)
    assert code == 0 and f"this run has ended already, in {folder}: finished after 2 epochs" in output, output
    assert "epoch 1/" not in output and "Traceback" not in output and results(tmp_path / "done") == (folder, finished)
    code, output = run([*done, "--resume", "yes", "--seed", "1"], tmp_path)  # another seed: missing, so trained
    assert code == 0 and "no stopped run of this group and seed" in output and "epoch 2/2" in output, output

    argv = small_run(tiny_data, tmp_path / "out", "--epochs", "100000", "--verbose", "1")
    preempted_at(argv, tmp_path, "epoch 1/")
    [stopped] = [path.parent for path in (tmp_path / "out").glob("*/*/results.json")]
    leftover = stopped / ".checkpoint.pt.k1ll3d.partial"  # a checkpoint write a kill cut short
    leftover.write_bytes(b"half a checkpoint")
    live = launch(argv, tmp_path)  # the same command again, training a run of its own
    resumed = None
    try:
        live_output = Output(live)
        live_output.wait_for(lambda line: line.startswith("epoch 1/"))
        resumed = launch([*argv, "--resume", "yes"], tmp_path)
        resumed_output = Output(resumed)
        resumed_output.wait_for(lambda line: line.startswith("epoch "))
        assert not leftover.exists()
        for proc in (live, resumed):
            os.killpg(proc.pid, signal.SIGINT)
        text, _ = resumed_output.finish()
        live_output.finish()
    finally:
        for proc in (live, resumed):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert f"Resuming the run in {stopped}" in text and resumed.returncode == 1, text
    res = json.loads((stopped / "results.json").read_text())
    assert [row["epoch"] for row in res["history"]] == list(range(1, len(res["history"]) + 1))
    assert len(res["history"]) >= 2 and res["tags"][-1] == "User abort"


def test_resume_yes_with_a_random_seed_continues_a_stopped_run_of_any_seed(tiny_data, tmp_path):
    argv = small_run(tiny_data, tmp_path / "out", "--epochs", "100000", "--verbose", "1", "--seed", "random")
    preempted_at(argv, tmp_path, "epoch 1/")
    folder, before = results(tmp_path / "out")
    text = resumed_for_an_epoch(argv, tmp_path)
    assert f"Resuming the run in {folder}" in text, text
    folder_after, after = results(tmp_path / "out")  # the same run, its own seed kept
    assert folder_after == folder and after["seed"] == before["seed"] and len(after["history"]) > len(before["history"])
    config = json.loads((folder / "config.json").read_text())
    assert config["seed"] == before["seed"]


def test_resume_yes_says_why_no_stopped_run_matched(tiny_data, tmp_path):
    """A stopped run is there, but not of this command: another seed, another value of a hyper-parameter,
    or a hyper-parameter added since it ran (which renames every group). --resume yes names which."""
    argv = small_run(tiny_data, tmp_path / "out", "--epochs", "100000", "--verbose", "1")
    preempted_at(argv, tmp_path, "epoch 1/")
    folder, _ = results(tmp_path / "out")

    def probe(*extra: str) -> str:  # each probe trains a run of its own, stopped: gone before the next
        text = resumed_for_an_epoch([*argv, *extra], tmp_path)
        for other in {path.parent for path in (tmp_path / "out").glob("*/*/results.json")} - {folder}:
            shutil.rmtree(other)
        return text

    text = probe("--seed", "1")
    assert "The stopped runs of this group have other seeds (0): give one with --seed" in text, text
    text = probe("--lr", "0.01")
    assert f"1 stopped run(s) under {tmp_path / 'out'} belong to other groups" in text, text
    assert f"the newest, in {folder}, differs by --lr 0.01 here, 0.001 there." in text, text
    # As if it ran before --dropout was a hyper-parameter: without it in its config, in a group of its own.
    old = tmp_path / "out" / "older-group-0123abcd" / folder.name
    old.parent.mkdir()
    folder = folder.rename(old)
    for name, change in (("config.json", lambda d: d.pop("dropout")), ("results.json", lambda d: d.pop("group"))):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps({**data, "group": old.parent.name}))
    text = probe()
    assert "differs by --dropout (added since it ran: a new hyper-parameter renames every group)" in text, text


def test_resume_yes_with_more_epochs_names_the_run_that_ended_and_how_to_start_from_it(tiny_data, tmp_path):
    """To train a run longer: --resume yes --epochs 3 after a finished 1-epoch run. --epochs is a hyper-parameter
    (a schedule's length depends on it), so the command is another group, and a run that ended is never
    trained again: a new run starts from scratch, and the message says which run ended, how it differs, and
    the --init_from that starts from its weights instead (until this test it said nothing of it)."""
    argv = small_run(tiny_data, tmp_path / "out", "--epochs", "1", "--verbose", "1")
    assert run(argv, tmp_path)[0] == 0
    folder, _ = results(tmp_path / "out")
    code, text = run([*argv, "--epochs", "3", "--resume", "yes"], tmp_path)
    assert code == 0 and "no stopped run of this group and seed" in text, text
    said = f"The newest run under {tmp_path / 'out'} that ended, in {folder}, differs by --epochs 3 here, 1 there."
    assert said in text and f"--init_from {folder / 'model.pt'}" in text, text
    code, text = run([*argv, "--epochs", "3", "--init_from", str(folder / "model.pt")], tmp_path)
    assert code == 0, text
