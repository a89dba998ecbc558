"""The watching process of main.py: it holds the W&B run and the run folder, and ends the run
properly whatever becomes of training.

main.py's train() runs in a process of its own (started with the spawn method, required with
CUDA) and reports through a pipe: ("ready", constants) once its data is loaded and its model built
(the figures that do not change: baselines, split sizes, parameter count), ("epoch", n, when) as an
epoch starts, ("row", row, tags) as it ends, ("done", tags) at the end, ("error", message, exit
status) when the run cannot start, or ("exception", message) when the training code raised one.
`Watch` starts it and turns its death or silence into a report of its own, ("ended", tag, message);
`Record` logs and saves every report at once, so nothing finished is lost. With --watchdog no,
main.py calls train() with Record.handle directly. Nothing here imports torch.
"""

import contextlib
import fcntl
import json
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import utils

WATCH_GRACE = 2.0  # seconds the watcher allows past a deadline before it acts
WANDB_INIT_TIMEOUT = 15.0  # seconds W&B's server has to answer before the run logs offline instead


def start_wandb(opts: dict, config: dict, run_id: str | None):
    # As for any W&B script: WANDB_PROJECT in the environment turns logging on like --wandb_project.
    if not (opts["wandb_project"] or os.environ.get("WANDB_PROJECT") or os.environ.get("WANDB_SWEEP_ID")):
        return None
    import wandb  # only runs that log pay for its import

    # Under `wandb agent` (WANDB_SWEEP_ID set) the project comes from the sweep. A resumed run
    # continues its own W&B run: resume="allow" with its id.
    init = dict(project=opts["wandb_project"], group=config["group"], config=config, id=run_id, resume="allow")
    if not os.environ.get("WANDB_INIT_TIMEOUT"):  # W&B's own 90 s would keep finished epochs waiting unsaved
        init["settings"] = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT)
    try:
        try:
            return with_epoch_axis(wandb.init(**init))
        except wandb.errors.CommError as e:  # W&B's server unreachable: nothing is lost offline
            print(f"Warning: W&B is unreachable ({str(e).splitlines()[0]}); logging offline instead. Upload "
                  "later with `wandb sync`.", file=sys.stderr)
            wandb.teardown()  # W&B's service still holds the run id of the attempt
            return with_epoch_axis(wandb.init(**init, mode="offline"))
    except Exception as e:  # W&B's own errors, and its service failing as it starts: name the cause
        cause = f"{type(e).__name__}: {' '.join(line.strip() for line in str(e).splitlines())[:300] or 'no message'}"
        login = isinstance(e, wandb.errors.AuthenticationError) or any(
            word in str(e).lower() for word in ("api key", "api_key", "login"))
        raise utils.StartError(f"W&B could not start ({cause}).\n" + ("Log in with `wandb login`, or run" if login
                               else "Run") + " with WANDB_MODE=offline (upload later with `wandb sync`).") from None


def with_epoch_axis(run):
    """The epoch metrics are plotted against `epoch`, whatever else is logged in between (a fork's
    own wandb.log calls in the batch loop advance W&B's step, not the epoch)."""
    run.define_metric("epoch")
    for split in (*utils.SPLITS, "gap"):
        run.define_metric(f"{split}/*", step_metric="epoch")
    return run


def check_writable(path: str) -> None:
    """Fail before training, not after it, when results could not be saved."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise utils.StartError(f"cannot save under --output_path {path}: {e.strerror or e}") from None


def previous_run(opts: dict, config: dict) -> tuple[Path, dict] | None:
    """The folder and results of this command's last run (same group and seed) that stopped before
    its end: ended with a tag --resume can continue from, or never ended (its watcher was killed too).
    Under `wandb agent` the run id says which: W&B re-queues a preempted run under its own id."""
    group = Path(opts["output_path"], config["group"])
    if os.environ.get("WANDB_RUN_ID"):
        candidates = [group / os.environ["WANDB_RUN_ID"]]
    else:
        candidates = sorted(group.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in candidates:
        if not (folder / "results.json").exists():  # not started yet, or never: nothing to continue
            continue
        try:
            results = json.loads((folder / "results.json").read_text())
            stopped = results["status"] == "running" or utils.resumable(results["tags"])
            if results["seed"] == opts["seed"] and stopped:
                return folder, results
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"Warning: --resume skipped the run in {folder}: its results.json could not be read "
                  f"({type(e).__name__}: {e}). Mend or delete that folder if it is the run to continue.",
                  file=sys.stderr)
    return None


def own(folder: Path) -> int:
    """An exclusive lock on the run folder for this process, which the OS releases however the process
    dies: a run is never trained by two processes at once (a job submitted twice, a re-queue racing a
    restart). Returns the lock's descriptor; close it when the run has ended."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise utils.StartError(f"the run in {folder} is being trained by another process, so this one leaves it "
                               "alone. Wait for that one to end (or stop it), then run this command again.") from None
    return fd


def run_folder(opts: dict, config: dict, resume: bool) -> tuple[Path, list, int]:
    """The run's folder, OUTPUT_PATH/GROUP/RUN_ID, owned by this process (see own()), and the history it
    already holds: with `resume`, that of the run to continue, if there is one; else a new folder
    holding config.json. RUN_ID is also the W&B run's id: WANDB_RUN_ID under `wandb agent`, else 8
    random hex digits."""
    check_writable(opts["output_path"])
    if resume and (found := previous_run(opts, config)):
        lock = own(found[0])
        print(f"Resuming the run in {found[0]}", file=sys.stderr)
        return found[0], found[1]["history"], lock
    folder = Path(opts["output_path"], config["group"], os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise utils.StartError(f"cannot make the run folder {folder}: {e.strerror or e}") from None
    lock = own(folder)
    try:
        utils.write_json(folder / "config.json", config)
    except OSError as e:
        os.close(lock)
        remove_run_folder(folder)
        raise utils.StartError(f"cannot write in the run folder {folder}: {e.strerror or e}") from None
    return folder, [], lock


def remove_run_folder(folder: Path) -> None:
    """The run's folder, and its group's too unless other runs use it."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def remove_if_unstarted(folder: Path | None) -> None:
    """A run that never started (it wrote no results.json) leaves nothing behind."""
    if folder and not (folder / "results.json").exists():
        remove_run_folder(folder)


def save_results(folder: Path | None, config: dict, run_path: str | None, history: list, tags: list,
                 status: str, constants: dict) -> None:
    if folder:
        utils.write_json(folder / "results.json", {
            "history": history, "tags": tags, "status": status, "group": config["group"],
            "seed": config["seed"], "constants": constants, "wandb_run_path": run_path})


class Record:
    """What the watching process keeps of the run, fed with the training process's reports. Each
    epoch is logged and saved as soon as it is reported, so nothing finished is lost if training
    dies afterwards. `status` is the exit status, once the run has ended."""

    def __init__(self, opts: dict, config: dict, folder: Path | None, history: list):
        self.opts, self.config, self.folder = opts, config, folder
        self.run, self.run_path, self.user_tags, self.constants = None, None, (), {}
        self.history, self.tags, self.status = history, [], None
        # Epochs W&B already has: a resumed run trains again those logged after its checkpoint.
        self.logged = max([row["epoch"] for row in history if "test/accuracy" in row], default=0)

    def handle(self, report: tuple) -> None:
        kind, *args = report
        if kind == "error" and args[1] == 2:  # a command-line value the data rules out
            utils.get_arg_parser().error(args[0])
        elif kind == "error":  # before W&B starts: the message says what to fix
            raise utils.StartError(args[0])
        elif kind == "ready":
            self.constants = args[0] if args else {}
            self.run = start_wandb(self.opts, self.config, self.folder.name if self.folder else None)
            if self.run and self.constants:
                self.use_wandb("recording the data's and model's figures", lambda: self.run.config.update(
                    self.constants, allow_val_change=True))
            self.run_path = self.run.path if self.run and not self.run.disabled else None
            self.user_tags = tuple(self.run.tags) if self.run else ()
            self.save("running")
        elif kind == "row":
            row, tags = args
            self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
            # W&B's history holds each whole epoch once: one cut short (a stop, a non-finite loss) is
            # trained again whole on resume, and W&B cannot overwrite a row, so it goes to the summary.
            if self.run and row["epoch"] > self.logged and "test/accuracy" in row:
                self.use_wandb(f"logging epoch {row['epoch']}", lambda: self.run.log(row))
            elif self.run and row["epoch"] > self.logged:
                self.use_wandb("noting the epoch cut short", lambda: self.run.summary.update({"cut_short": row}))
            if self.run and tags != self.tags:  # set as they are raised: a live run can be filtered by them
                self.use_wandb("setting its tags", lambda: setattr(self.run, "tags", self.wandb_tags(tags)))
            self.tags = tags
            self.save("running")
        elif kind == "done":
            self.finish(*args)  # the tags, and why a file could not be saved, if one could not
        elif kind == "exception":  # a bug in the training code: its traceback is on screen already
            self.finish(self.tags + [utils.EXCEPTION()], args[0])
        elif kind == "ended":  # from the watcher: the training process died or hung
            tag, message = args
            self.finish(self.tags + [tag], message)

    def wandb_tags(self, tags: list) -> tuple:
        """The run's tags: those the user gave W&B (WANDB_TAGS), then the run's own."""
        return tuple(dict.fromkeys([*self.user_tags, *tags]))

    def use_wandb(self, what: str, call) -> None:
        """W&B's service can die mid-run (killed, out of memory): say what is lost, and go on without
        it. Training and results.json never depend on W&B."""
        try:
            call()
        except Exception as e:
            print(f"Warning: W&B failed while {what} ({type(e).__name__}: {str(e).strip()[:200]}): its service has "
                  "probably died, and what it had not written yet is lost from W&B. The run goes on without it; "
                  "results.json holds every epoch and the run's end.", file=sys.stderr, flush=True)
            self.run = None
            with contextlib.suppress(Exception):  # now, or W&B's exit hook prints the broken link's traceback
                sys.modules["wandb"].teardown()

    def save(self, status: str) -> None:
        """Write results.json; when it cannot be written (a full disk), the run ends here with that reason,
        its previous results.json and checkpoint kept, and RunEnded stops the training loop."""
        if not self.folder:
            return
        unsaved = utils.write_failure(self.folder / "results.json", lambda: save_results(
            self.folder, self.config, self.run_path, self.history, self.tags, status, self.constants))
        if unsaved and status == "running":
            self.finish(self.tags + [utils.SAVE_FAILED()], unsaved)
            raise utils.RunEnded()

    def finish(self, tags: list, message: str | None = None) -> None:
        self.tags = list(dict.fromkeys(tags))
        failed = utils.failed(self.tags)
        status = "failed" if failed else "finished"
        self.save(status)
        if message:  # before W&B finishes: its Logs tab holds the reason too
            print(f"Error: {message}", file=sys.stderr, flush=True)
        if self.run:
            def finish():
                self.run.summary["seed"] = self.config["seed"]
                if message:
                    self.run.summary["end"] = message
                self.run.tags = self.wandb_tags(self.tags)
                if utils.PREEMPTED() in self.tags:
                    self.run.mark_preempting()  # W&B then re-queues a preempted sweep run
                self.run.finish(exit_code=int(failed))
            self.use_wandb("finishing the run", finish)
        resumable = self.opts["checkpoint_every"] and utils.resumable(self.tags)
        if self.folder and not resumable:
            (self.folder / "checkpoint.pt").unlink(missing_ok=True)
            if not self.opts["save"]:
                remove_run_folder(self.folder)
        if self.opts["verbose"]:
            print(f"Run {status}. Group {self.config['group']}, seed {self.config['seed']}. "
                  f"Tags: {', '.join(self.tags) or 'none'}")
            if self.folder and (self.opts["save"] or resumable):
                print(f"Saved in {self.folder}" + (": continue it with --resume yes" if resumable else ""))
        self.status = int(failed)


class Watch:
    """Runs train() in a process of its own and watches it: forwards SIGINT and SIGTERM to it (a
    second Ctrl+C kills it), kills it when an epoch outlives --epoch_timeout (a hang in native
    code never reaches the loop's own check), and notices when it dies. Every wait has a timeout."""

    def __init__(self, target, opts: dict, *args):
        """Starts target(opts, *args, connection): the training process's entry, a module-level function."""
        self.deadline, self.stop_tag = math.inf, None
        context = multiprocessing.get_context("spawn")
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=target, args=(opts, *args, send), name="training")
        # Handled, not ignored, before the start: an ignored signal would stay ignored in the new process.
        self.previous = {s: signal.signal(s, self._forward) for s in utils.STOP_SIGNALS}
        self.process.start()
        send.close()  # the training process holds the only sending end: its death closes the pipe
        self.minutes = opts["epoch_timeout"]
        self.timeout = 60 * self.minutes + WATCH_GRACE if self.minutes else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=WATCH_GRACE)

    def _forward(self, signum, frame):
        if signum == signal.SIGINT and self.stop_tag == utils.USER_ABORT():
            print("\nSecond Ctrl+C: ending the run now.", file=sys.stderr, flush=True)
            self.process.kill()
            return
        self.stop_tag = self.stop_tag or utils.STOP_SIGNALS[signum]()
        if self.process.pid and self.process.is_alive():
            os.kill(self.process.pid, signum)

    def next(self) -> tuple:
        """The training process's next report, or ("ended", tag, message) when it died or hung."""
        while True:
            if self.receive.poll(min(1.0, max(0.0, self.deadline - time.monotonic()))):
                try:
                    message = self.receive.recv()
                except EOFError:
                    break
                # Once ready, the training process reports at least once an epoch: as one starts, as it
                # ends (then its checkpoint is written). Silence past the timeout is a hang.
                since = message[2] if message[0] == "epoch" else time.monotonic()
                self.deadline = since + self.timeout if self.timeout and message[0] != "done" else math.inf
                return message
            if time.monotonic() > self.deadline:
                self.process.kill()
                return ("ended", utils.TIMEOUT(), f"an epoch ran past --epoch_timeout {self.minutes:g} min and "
                        "did not stop by itself: the training process was stuck, and has been killed")
            if not self.process.is_alive() and not self.receive.poll(0):
                break
        self.process.join(timeout=WATCH_GRACE)
        if self.stop_tag:  # it was asked to stop (a second Ctrl+C kills it): the stop names the end
            return ("ended", self.stop_tag, None)
        code = self.process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with status {code}"
        oom = " (the out-of-memory killer sends SIGKILL)" if code == -signal.SIGKILL else ""
        return ("ended", utils.CRASHED(), f"the training process {how}{oom} before the end of the run")
