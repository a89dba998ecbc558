"""Shared fixtures: the demo's tiny data (demo.py), W&B offline, runs of main.py."""

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo import small_run, write_dataset  # noqa: F401 (small_run: for the tests)

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # real W&B, writing its run files locally
WAIT = 120  # seconds a test waits for a line of a process's output before it fails with what it read


def cores() -> int:
    """The cores this process may use (a job's share), as main.py counts them where it can."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    """pytest -n auto (pytest.ini): two tests a core. Most of a test waits on the processes it starts (for
    their start, for the moment of a fault): with one a core the suite kept 1.66 of this machine's 2 cores
    busy and took 21.5 minutes, with two 1.90 and 17 (docs/development.md); three a core gained nothing.
    And no more than one per 2 GiB of memory: four here used 5.5 GiB at most, with their processes."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(2 * cores(), int(memory // 2)))


# Tests side by side (pytest -n, pytest.ini): each gets its share of the cores for torch's threads, in its
# own process and in the runs it starts, as local_sweep.py gives its runs. Torch's threads spin while they
# wait for each other, and two processes with a thread per core each take turns badly
# (docs/performance.md, "Runs at the same time"). Set here, before any test module imports torch.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() // workers)))


def in_memory(dataset, count: int | None = None):
    """The first `count` samples (all by default) of any map-style dataset, as a TensorDataset: the tests
    that drive train_epoch's device-resident path straight take a fork's data this way, whether its
    load_data gives tensors or a Dataset that reads from disk."""
    import torch
    from torch.utils.data import TensorDataset

    xs, ys = zip(*(dataset[i] for i in range(len(dataset) if count is None else count)), strict=True)
    return TensorDataset(torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys))


def copy_project(folder: Path) -> Path:
    """A copy of the project's code (main.py, utils.py, the tools, the boilerplate package), as a fork starts."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*ROOT.glob("*.py"), ROOT / "adjectives.txt", ROOT / "nouns.txt", ROOT / "LICENSE"]:
        shutil.copy(path, folder / path.name)
    shutil.copytree(ROOT / "boilerplate", folder / "boilerplate", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def fork(tmp_path: Path, *changes: tuple[str, str]) -> Path:
    """A copy of the project whose main.py has each (anchor, code) change: code inserted before the anchor."""
    folder = copy_project(tmp_path / "fork")
    source = (folder / "main.py").read_text()
    for anchor, code in changes:
        assert source.count(anchor) == 1, anchor
        source = source.replace(anchor, code + anchor)
    (folder / "main.py").write_text(source)
    return folder


def calls_wandb(script: Path) -> bool:
    """Whether the experiment's code calls W&B itself (a fork's own wandb.log), not through the run: such a
    call raises when W&B's service has died, and the run ends `W&B lost`, resumable, by design."""
    import ast

    tree = ast.parse(script.read_text())
    return any(isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "wandb" for n in ast.walk(tree))


def parse(*args: str):
    """main.py's options for this command line, as main.py's functions take them (args.lr)."""
    import main

    return main.get_parser().parse_args(list(args))


def group_of(opts: dict) -> str:
    """The W&B group of a run with these options (a dict: vars(args))."""
    import main
    import utils
    from boilerplate import options

    return utils.generate_name(opts, options.hyperparameter_names(main.get_parser()))


def experiment():
    """main.py's parts as its main() hands them to the run (read now: a test may have replaced one)."""
    import main
    from boilerplate import session

    return session.Experiment(*(getattr(main, name) for name in session.Experiment._fields))


def one_epoch(model, optimizer, batches, args, generator=None, stop=None, sync_every: int = 1, schedule=None):
    """main.train_epoch over `batches`, as the run calls it: its statistics and the tag that stopped it early."""
    import torch

    import main
    from boilerplate import watch
    from boilerplate.steps import Steps

    generator = generator or torch.Generator().manual_seed(0)
    steps = Steps(
        batches,
        args.batch_size,
        generator,
        model,
        optimizer,
        stop or watch.Link(),
        accumulate=args.accumulate,
        precision=args.precision,
        sync_every=sync_every,
        predictions_of=main.predictions_of,
    )
    main.train_epoch(model, optimizer, schedule, steps, args)
    return steps.end()


@contextlib.contextmanager
def a_disabled_run():
    """Training code called straight from a test runs as in `python main.py` without W&B: inside W&B's
    disabled run (wandb_start.disabled_run), so a fork's own wandb.log there works, and what it reads from
    the device is seen (a fork that skips its call when there is no run would hide it from test_syncs)."""
    from boilerplate import wandb_start

    run = wandb_start.disabled_run()
    try:
        yield run
    finally:
        run.finish()
        wandb_start.teardown()  # W&B reads its settings once a process: the next test's are read afresh


@pytest.fixture
def in_a_run():
    """A test's training code called straight, inside W&B's disabled run (a_disabled_run)."""
    with a_disabled_run() as run:
        yield run


@pytest.fixture
def wandb_server():
    """A local stand-in of W&B's server (tests/wandb_server.py), for the tests of the online path."""
    from wandb_server import WandbServer

    server = WandbServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """600 training and 200 test images that an MLP learns in an epoch or two."""
    return write_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def overfit_data(tmp_path_factory) -> Path:
    """As tiny_data, but the test labels are shuffled: what is learnt cannot carry over."""
    return write_dataset(tmp_path_factory.mktemp("overfit"), shuffle="test")


@pytest.fixture(scope="session")
def noise_data(tmp_path_factory) -> Path:
    """As tiny_data, but the training labels are shuffled: nothing can be learnt, only memorised."""
    return write_dataset(tmp_path_factory.mktemp("noise"), shuffle="train")


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Real W&B in offline mode, writing into this test's own folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    yield tmp_path
    import wandb

    wandb.teardown()  # W&B reads its settings once per process: the next test's WANDB_DIR needs a fresh start


def results(out: Path) -> tuple[Path, dict]:
    """The one run folder saved under `out`, and its results.json (which parses: written whole or not at all)."""
    [path] = out.glob("*/*/results.json")
    return path.parent, json.loads(path.read_text())


def whole_epochs(history: list[dict]) -> list[int]:
    """The epochs of results.json's history trained to their end and evaluated: those W&B's history holds."""
    return [row["epoch"] for row in history if row["evaluated"]]


def epoch_rows(history: list[dict]) -> list[dict]:
    """W&B's history without the rows a fork logs of its own (in the loop, say). Not "epoch" alone: W&B
    adds the epoch to a fork's row whose key matches a split's define_metric (test/confusion, say). The
    loop's own count of an epoch's batches is in the epoch's row alone."""
    return [row for row in history if "epoch" in row and "train/batches" in row]


def wandb_epochs(history: list[dict]) -> list[int]:
    """The epochs W&B's history holds."""
    return [row["epoch"] for row in epoch_rows(history)]


def without_times(history: list[dict]) -> list[dict]:
    """The history as a rerun must repeat it exactly: without the times, which no rerun repeats."""
    return [{k: v for k, v in row.items() if not k.endswith("/time")} for row in history]


def start_main(args: list[str], script: Path = ROOT / "main.py", **kwargs) -> subprocess.Popen:
    """`python main.py ARGS` (or a fork's `script`) as a real process, in a session of its own like a shell job."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=kwargs.pop("cwd", ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        text=True,
        start_new_session=True,
        **kwargs,
    )


def processes_with(marker: str) -> list[str]:
    """The processes whose command line holds `marker` (a test's folder, say)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(request):
    """A test that fails midway may leave a run it started behind, in a process group of its own (as W&B's
    agent starts runs): killed here, or it would train on, slowing every later test (it once made six
    stop tests of a fork's suite fail by time)."""
    folder = str(request.getfixturevalue("tmp_path")) if "tmp_path" in request.fixturenames else None
    yield
    for pid in processes_with(folder) if folder else []:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(autouse=True)
def no_wandb_service_outlives_its_test():
    """W&B's in-process service leaves its address in WANDB_SERVICE, where every process started later
    inherits it and joins it rather than starting its own: a later test's run then logs through an earlier
    test's service (its settings, its faults), and a test waiting for the run's own wandb-core waits forever."""
    yield
    if os.environ.get("WANDB_SERVICE") and (wandb := sys.modules.get("wandb")):
        # teardown waits for the service to end, and a service still retrying a server that went away (the
        # report's unreachable-server case) once kept it waiting past the test's timeout: bounded, then killed
        ending = threading.Thread(target=wandb.teardown, daemon=True)
        ending.start()
        ending.join(20)
        for pid in children(os.getpid(), b"wandb-core") if ending.is_alive() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ending.join(20)


def children(pid: int, program: bytes) -> list[int]:
    """The processes `pid` started whose command line names `program`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and program in cmdline:
            found.append(int(entry.name))
    return found


def training_process(pid: int) -> int:
    """The pid of main.py's training process: the guard's child, main.py run again."""
    for _ in range(100):
        if found := children(pid, b"main.py"):
            return found[0]
        time.sleep(0.1)
    raise AssertionError("no training process found")


def training_process_of_rank(job: int, rank: int, guarded: bool = True) -> int:
    """The training process (main.py run again by its guard) of one rank of the job torchrun `job` started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for guard in children(job, b"main.py"):
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{guard}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ and not guarded:
                    return guard
                if f"RANK={rank}".encode() in environ and (trained := children(guard, b"main.py")):
                    return trained[0]
        time.sleep(0.05)
    raise AssertionError(f"no training process of rank {rank}")


def kill_as_the_end_is_written(out: Path, pid: int, proc: subprocess.Popen) -> bool:
    """SIGKILL to process `pid` as soon as the run under `out` has saved its end (results.json's status is no
    longer running: W&B's finish comes next); whether it came before `proc` had ended."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ValueError, OSError):  # not there yet, or written as it is read
            saved = list(out.glob("*/*/results.json"))
            if saved and json.loads(saved[0].read_text())["status"] != "running":
                os.kill(pid, signal.SIGKILL)
                return True
        time.sleep(0.002)
    return False


def descendants(pid: int) -> list[int]:
    """Every process under `pid`: its children, theirs, and so on."""
    tree, found = [pid], True
    while found:
        found = [child for parent in tree for child in children(parent, b"") if child not in tree]
        tree += found
    return tree[1:]


def end_hung(proc: subprocess.Popen) -> None:
    """Kill a hung process and every process under it (torchrun starts each rank in a session of its own:
    none left to slow the tests after it). First SIGABRT to them all: a Python process started with
    PYTHONFAULTHANDLER=1 prints every thread's stack into the output, to tell where it hung."""
    tree = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGABRT, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(5 if sig == signal.SIGABRT else 0)  # the stacks are written
    proc.wait()
    time.sleep(1)  # the readers take the last of the output


class Output:
    """A process's output, read by threads as it comes, so that a test waiting for a line never waits
    forever: a wait that times out, or meets the end of the output, fails with everything read so far."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.new = proc, {"stdout": [], "stderr": []}, queue.Queue()
        self.readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
            if stream
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines[name].append(line)
            if name == "stdout":
                self.new.put(line)
        if name == "stdout":
            self.new.put(None)

    def __str__(self) -> str:
        return "".join(self.lines["stdout"]) + "".join(self.lines["stderr"])

    def wait_for(self, seen, count: int = 1, timeout: float = WAIT) -> str:
        """The count-th line of stdout from now on for which seen(line) holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"nothing awaited within {timeout:g} s; the output so far:\n{self}") from None
            if line is None:
                raise AssertionError(f"the output ended before what was awaited:\n{self}")
            count -= bool(seen(line))
            if count == 0:
                return line

    def finish(self, timeout: float = WAIT) -> tuple[str, str]:
        """stdout and stderr, whole, once the process has ended; it is killed if it outlives `timeout`."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            end_hung(self.proc)
            raise AssertionError(f"the process did not end within {timeout:g} s; its output:\n{self}") from None
        for reader in self.readers:
            reader.join(timeout)
        return "".join(self.lines["stdout"]), "".join(self.lines["stderr"])


class Kernel:
    """A real Jupyter kernel (ipykernel), as a notebook runs one: cells sent, what they print read back.
    With `server`, its connection file is where a Jupyter server keeps it (~/.local/share/jupyter/runtime):
    W&B knows a notebook by that, and only there asks for its key through the notebook."""

    def __init__(self, cwd: Path, env: dict[str, str], server: bool = False):
        from jupyter_client.manager import KernelManager

        runtime = Path(cwd, ".local/share/jupyter/runtime" if server else ".")
        runtime.mkdir(parents=True, exist_ok=True)
        self.manager = KernelManager(kernel_name="python3", connection_file=str(runtime / "kernel-test.json"))
        self.manager.start_kernel(cwd=str(cwd), env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=WAIT)

    def run(self, code: str, until: str | None = None, then=None, timeout: float = WAIT, answer=None) -> str:
        """The cell's output (its error's name and value too), to its end; `then()` once `until` is printed.
        `answer(prompt)` replies to each input the cell asks for (None: no reply); without it, the cell may
        ask for none, as where no one is there to answer (papermill, nbconvert)."""
        msg_id, text = self.client.execute(code, allow_stdin=answer is not None), ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                request = self.client.get_stdin_msg(timeout=0) if answer else None
                if request and (reply := answer(request["content"]["prompt"])) is not None:
                    self.client.input(reply)
            with contextlib.suppress(queue.Empty):
                message = self.client.get_iopub_msg(timeout=0.2)
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "stream":
                    text += content["text"]
                elif kind == "error":
                    text += f"{content['ename']}: {content['evalue']}\n"
                elif kind == "execute_result":
                    text += content["data"]["text/plain"] + "\n"
                elif kind == "status" and content["execution_state"] == "idle":
                    return text
                if until and until in text and then:
                    then, _ = None, then()
        pytest.fail(f"the cell never ended: {text}")

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
