"""What a run keeps: its folder (config.json, results.json, checkpoints), its W&B run, its end.

The training process owns all of it while it lives (main.py calls Record as each thing happens: the
run starts, an epoch starts, an epoch ends, the run ends). If it dies or hangs, the guard (watch.py)
takes the run over and writes its end with the same Record: results.json's status and tags, and the
W&B run re-opened by its id to be tagged and finished Failed. Nothing here imports torch, or wandb
before a run starts.
"""

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import utils

from . import errors, files, wandb_start

if TYPE_CHECKING:  # wandb is imported by the runs that log, as they start
    import wandb

    from . import watch


def server_epochs(run: "wandb.Run") -> set[int]:
    """The epochs W&B's server holds in the history of `run` (online), and 0. Its history, not its summary:
    W&B sends a row's summary apart from the row, and a process killed between the two leaves the summary
    ahead (seen under load: the summary at epoch 1, the history empty). The history is what the process
    logged, in order, up to what the server received."""
    import wandb
    from wandb.errors import CommError, UsageError

    try:
        api = wandb.Api(timeout=int(wandb_start.limit()))
        rows = api.run(run.path).history(keys=["epoch"], samples=1_000_000, pandas=False)
        return {0, *(row["epoch"] for row in rows)}
    except (CommError, UsageError, OSError, ValueError) as e:  # OSError: requests' errors among them
        last = run.summary.get("epoch") or 0
        print(
            f"Warning: W&B's server did not say which epochs its history holds ({type(e).__name__}: {e}): taken "
            f"as those up to {last}, the epoch its summary names, which can be ahead of its history.",
            file=sys.stderr,
            flush=True,
        )
        return {0, last}


def wandb_wanted(opts: dict) -> bool:
    """As for any W&B script: WANDB_PROJECT in the environment turns logging on like --wandb_project;
    under `wandb agent` (WANDB_SWEEP_ID set) the project comes from the sweep."""
    return bool(opts["wandb_project"] or os.environ.get("WANDB_PROJECT") or os.environ.get("WANDB_SWEEP_ID"))


def with_epoch_axis(run: "wandb.Run") -> "wandb.Run":
    """The epoch metrics are plotted against `epoch`, whatever else is logged in between (a fork's
    own wandb.log calls in the batch loop advance W&B's step, not the epoch). The summary of each
    validation metric holds its best value and its last (the sweep engine ranks runs by the best value
    in the history); of each test metric, its last alone: the test score at the best validation epoch is
    best/... (Record.log), never a maximum over the epochs, which would select the model on the test set."""
    run.define_metric("epoch")
    for split in (*utils.SPLITS, "gap"):
        run.define_metric(f"{split}/*", step_metric="epoch")
    for monitor, higher in utils.monitors().items():
        run.define_metric(monitor, step_metric="epoch", summary=f"{'max' if higher else 'min'},last")
    for metric in (*utils.METRIC_NAMES, "loss"):
        run.define_metric(f"test/{metric}", step_metric="epoch", summary="last")
    return run


class Busy(errors.StartError):
    """The run folder is owned by another process, which trains the run."""


class AlreadyEnded(Exception):
    """--resume yes found this command's run ended for good: nothing to train. Its folder and results."""

    def __init__(self, folder: Path, results: dict):
        super().__init__(folder)
        self.folder, self.results = folder, results


def previous_runs(opts: dict, config: dict, any_seed: bool) -> list[tuple[Path, dict]]:
    """This command's earlier runs (same group and seed, or any seed), newest first, with their results.
    Under `wandb agent` the run id says which: W&B re-queues a preempted run under its own id."""
    group = Path(opts["output_path"], config["group"])
    if os.environ.get("WANDB_RUN_ID"):
        candidates = [group / os.environ["WANDB_RUN_ID"]]
    else:
        candidates = sorted(group.glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    found = []
    for folder in candidates:
        if not (folder / "results.json").exists():  # not started yet, or never: nothing to continue
            continue
        try:
            results = json.loads((folder / "results.json").read_text())
            if any_seed or results["seed"] == opts["seed"]:
                stopped(results)  # a results.json without status or tags is damaged
                found.append((folder, results))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(
                f"Warning: --resume skipped the run in {folder}: its results.json could not be read "
                f"({type(e).__name__}: {e}). Mend or delete that folder if it is the run to continue.",
                file=sys.stderr,
            )
    return found


def wandb_row(row: dict) -> dict:
    """An epoch's row as W&B's history holds it: every row there is evaluated, so the flag is left out."""
    return {key: value for key, value in row.items() if key != "evaluated"}


def why_no_match(opts: dict, config: dict, any_seed: bool, hyperparameters: list[str]) -> str:
    """What --resume yes would have continued but for this command's group or seed: stopped runs of this
    group with other seeds, the newest stopped run of another group with the hyper-parameters that set it
    apart (a hyper-parameter added since it ran among them), and, when no run of another group is stopped,
    the newest that ended (`--epochs 20` after a 10-epoch run: another group, and a run that ended is never
    trained again; its weights can start a new one). Empty when there is none."""
    output, seeds, others, ended = Path(opts["output_path"]), set(), [], []
    for path in output.glob("*/*/results.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            results = json.loads(path.read_text())
            if results["group"] == config["group"]:
                seeds.update([results["seed"]] if stopped(results) else [])
            else:
                (others if stopped(results) else ended).append(path.parent)
    reasons = []
    if seeds and not any_seed:
        reasons.append(
            f"The stopped runs of this group have other seeds ({', '.join(map(str, sorted(seeds)))}): "
            "give one with --seed, or --seed random for any."
        )
    if others or ended:
        newest = max(others or ended, key=lambda folder: folder.stat().st_mtime)
        with contextlib.suppress(OSError, ValueError):
            theirs = json.loads((newest / "config.json").read_text())
            mine = files.json_safe(config)
            differences = [
                f"--{name} {json.dumps(mine[name])} here, {json.dumps(theirs[name])} there"
                if name in theirs
                else f"--{name} (added since it ran: a new hyper-parameter renames every group)"
                for name in hyperparameters
                if theirs.get(name, object()) != mine[name]
            ]
            differs = f"differs by {'; '.join(differences) or 'its group name alone (the words files changed?)'}"
            if others:
                reasons.append(
                    f"{len(others)} stopped run(s) under {output} belong to other groups; the newest, in {newest}, "
                    f"{differs}."
                )
            else:
                weights = next((newest / name for name in ("model.pt", "best.pt") if (newest / name).exists()), None)
                start = f" To start a new one from its weights (optimizer and schedule afresh): --init_from {weights}"
                reasons.append(
                    f"The newest run under {output} that ended, in {newest}, {differs}. A run that ended is never "
                    f"trained again.{start if weights else ''}"
                )
    return "".join(f"\n  {reason}" for reason in reasons)


def stopped(results: dict) -> bool:
    """Whether a run stopped before its end: it ended with a tag --resume can continue from, or it never
    ended (its guard was killed too)."""
    return results["status"] == "running" or utils.resumable(results["tags"])


def torchrun_job() -> str | None:
    """The torchrun job this process is part of, kept in results.json: its --rdzv-id, which torchrun draws
    anew for each launch on one machine. None outside torchrun, and for a job across machines left unnamed
    (torch's default id, "none", is every such job's)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return job if job and job != "none" else None


def resume_folder(opts: dict, config: dict, any_seed: bool, job: str | None = None) -> tuple[Path, dict, int] | None:
    """The run --resume yes continues, owned by this process: the newest stopped run of this command that
    no process trains (with `job`, of that torchrun job alone). None when there is none; AlreadyEnded when
    this command's newest run before it ended for good (with `any_seed`, for --seed random, none counts:
    each such run is a new replicate); Busy when every stopped one is being trained."""
    busy = None
    for folder, results in previous_runs(opts, config, any_seed):
        if job is not None and results.get("job") != job:
            continue
        if stopped(results):
            try:
                lock = own(folder)
            except Busy:
                busy = busy or folder
                continue
            with contextlib.suppress(OSError, ValueError):  # it may have ended while we looked
                results = json.loads((folder / "results.json").read_text())
            if stopped(results):
                files.remove_partial_writes(folder)
                return folder, results, lock
            os.close(lock)
        if not any_seed:
            raise AlreadyEnded(folder, results)
    if busy:
        raise Busy(
            f"the run in {busy} is being trained by another process, so this one leaves it alone. Wait for "
            "that one to end (or stop it), then run this command again."
        )
    return None


def own(folder: Path, wait: float = 0.0) -> int:
    """An exclusive lock on the run folder for this process, which the OS releases however the process
    dies: a run is never trained by two processes at once (a job submitted twice, a re-queue racing a
    restart). Waits up to `wait` seconds for it, else raises Busy. Returns the lock's descriptor; close
    it when the run has ended."""
    fd, deadline = os.open(folder, os.O_RDONLY), time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            os.close(fd)
            raise Busy(
                f"the run in {folder} is being trained by another process, so this one leaves it alone. "
                "Wait for that one to end (or stop it), then run this command again."
            ) from None


def run_folder(
    opts: dict,
    config: dict,
    resume: bool,
    any_seed: bool,
    hyperparameters: list[str],
    asked: str = "--resume yes",
    job: str | None = None,
    quiet: bool = False,
) -> tuple[Path, dict | None, int]:
    """The run's folder, OUTPUT_PATH/GROUP/RUN_ID, owned by this process (see own()), and, with `resume`,
    the results of the run it continues (see resume_folder; with `job`, a run of that torchrun job alone);
    else a new folder holding config.json, and None. RUN_ID is also the W&B run's id: WANDB_RUN_ID under
    `wandb agent`, else 8 random hex digits. `asked`: what asked for the resume, as the messages name it;
    `quiet`: no word when there is no run to resume (a job's first start)."""
    wandb_start.check_writable(opts["output_path"])
    if resume:
        if found := resume_folder(opts, config, any_seed, job):
            print(f"Resuming the run in {found[0]}", file=sys.stderr)
            return found
        if not quiet and not os.environ.get("WANDB_RUN_ID"):  # under the agent a new run id is a new run
            which = "of this group" if any_seed else "of this group and seed"
            print(
                f"{asked}: no stopped run {which} under {Path(opts['output_path'], config['group'])}; "
                f"starting a new one.{why_no_match(opts, config, any_seed, hyperparameters)}",
                file=sys.stderr,
            )
    folder = Path(opts["output_path"], config["group"], os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.StartError(f"cannot make the run folder {folder}: {e.strerror or e}") from None
    lock = own(folder)
    try:
        files.write_json(folder / "config.json", config)
    except OSError as e:
        os.close(lock)
        remove_run_folder(folder)
        raise errors.StartError(f"cannot write in the run folder {folder}: {e.strerror or e}") from None
    return folder, None, lock


def remove_run_folder(folder: Path) -> None:
    """The run's folder, and its group's too unless other runs use it."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def remove_if_unstarted(folder: Path | None) -> None:
    """A run that never started (it wrote no results.json) leaves nothing behind."""
    if folder and not (folder / "results.json").exists():
        remove_run_folder(folder)


def save_results(
    folder: Path | None, config: dict, run_path: str | None, history: list, tags: list, status: str, constants: dict
) -> None:
    """results.json: every epoch, the tags, the status, and the best epoch by --monitor (best/..., or null)."""
    if folder:
        best = utils.best_epoch(history, config["monitor"])
        files.write_json(
            folder / "results.json",
            {
                "history": history,
                "tags": tags,
                "status": status,
                "group": config["group"],
                "seed": config["seed"],
                "best": utils.best_summary(best) if best else None,
                "constants": constants,
                "wandb_run_path": run_path,
                "job": torchrun_job(),
            },
        )


class Record:
    """What the run keeps, as it happens: each epoch is logged and saved as soon as it has ended, so
    nothing finished is lost if training dies afterwards. `guard` (watch.Channel, or None with
    --watchdog no) hears of each step, so that it can take the run over. `status` is the exit status,
    once the run has ended."""

    def __init__(
        self,
        opts: dict,
        config: dict,
        folder: Path | None,
        history: list,
        guard: "watch.Link | None" = None,
        owner: bool = True,
    ):
        # `owner`: this process writes the run (W&B, results, the screen's summary); under torchrun, rank 0 alone.
        self.opts, self.config, self.folder, self.guard, self.owner = opts, config, folder, guard, owner
        self.run, self.run_path, self.user_tags, self.constants = None, None, (), {}
        self.history, self.tags, self.status = history, [], None
        # Epochs W&B already has: a resumed run trains again those logged after its checkpoint.
        self.logged = max([row["epoch"] for row in history if row.get("evaluated")], default=0)
        self.tell_guard("starting", folder=str(folder) if folder else None)

    def prepare_wandb(self) -> None:
        """What W&B's start needs, checked before the data loads (wandb_start.prepare): W&B's settings, room for
        its run, and its key where W&B would ask a person for it. A stop at W&B's prompt ends the run before
        it began."""
        from . import watch

        if self.owner and wandb_wanted(self.opts):
            with self.guard.deferred() if self.guard else contextlib.nullcontext():
                found = wandb_start.prepare(lambda: bool(self.guard and self.guard.requested))
            if watch.in_ipython():  # a notebook's prompt: the interrupt button must reach its wait, undeferred
                wandb_start.log_in_notebook(found)

    def start(self, constants: dict) -> None:
        """The run starts: its data is loaded and its model built. W&B starts now, in this process, so
        that a fork's own wandb.log calls anywhere in the training code land in this run."""
        before, now = self.constants.get("code/version"), constants.get("code/version")
        if before and now and before != now:  # a resumed run: its epochs so far were trained by other code
            print(
                f"Warning: this run began under other code (code/version {before}) and goes on under this code "
                f"({now}): its results mix the two",
                file=sys.stderr,
            )
        self.constants = constants  # the figures that do not change: baselines, split sizes, parameter count
        if self.owner and wandb_wanted(self.opts):

            def prepare(
                run: "wandb.Run",
            ) -> "wandb.Run":  # part of W&B's start: a service that dies just after wandb.init fails here
                run.config.update(self.constants, allow_val_change=True)
                # Each epoch is logged to W&B, then saved to results.json: a kill (or a full disk) between the
                # two leaves W&B one epoch ahead. The server's history says so, and a resume trains that epoch
                # again but logs it once. (Offline, a re-opened run starts with nothing.)
                if run.resumed and not run.offline:
                    self.logged = max(self.logged, *server_epochs(run))
                return with_epoch_axis(run)

            self.tell_guard("waiting", seconds=wandb_start.limit())
            # A resumed run continues its own W&B run: resume="allow" with its id (under `wandb agent`, the
            # agent's). One id for every try, so that a second try re-opens the first's run.
            self.run = wandb_start.start_wandb(
                prepare,
                project=self.opts["wandb_project"],
                group=self.config["group"],
                config=self.config,
                id=self.folder.name if self.folder else os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4),
                resume="allow",
            )
        if self.run is None:  # W&B's own way to log nothing: a fork's wandb.log calls work without W&B too
            self.run = wandb_start.disabled_run()
        self.run_path = self.run.path if self.run and not self.run.disabled else None
        if self.owner and self.opts["log_model"] != "no" and not self.run_path:  # asked for, and nowhere to go
            why = " (no --wandb_project, WANDB_PROJECT or sweep asks for one)" if not wandb_wanted(self.opts) else ""
            why = " (WANDB_MODE=disabled)" if why == "" and os.environ.get("WANDB_MODE") == "disabled" else why
            keeps = "best.pt" if self.opts["log_model"] == "best" else "model.pt"
            print(
                f"Warning: --log_model {self.opts['log_model']} logs the model to W&B, and this run logs to no W&B "
                f"run{why}: no model will be logged (with --save yes, {keeps} in the run folder holds it)",
                file=sys.stderr,
            )
        self.user_tags = tuple(self.run.tags) if self.run else ()
        self.save("running")
        self.tell_guard(
            "started",
            folder=str(self.folder) if self.folder else None,
            config=self.config,
            wandb=self.wandb_address(),
            owner=self.owner,
        )

    def wandb_address(self) -> dict | None:
        """What re-opens this W&B run from another process."""
        if not self.run_path:
            return None
        return {
            "id": self.run.id,
            "project": self.run.project,
            "entity": self.run.entity,
            "path": self.run_path,
            "mode": "offline" if self.run.offline else None,
            "user_tags": list(self.user_tags),
            "sync_dir": self.run.settings.sync_dir,
        }

    def epoch_started(self, epoch: int) -> None:
        self.tell_guard("epoch", epoch=epoch, started=time.monotonic())  # the machine's clock: the guard reads it too

    def log(self, row: dict, tags: list) -> None:
        """An epoch has ended (whole, or cut short by a stop): W&B's history and results.json."""
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        # W&B's history holds each whole epoch once: one cut short (a stop, a non-finite loss) is
        # trained again whole on resume, and W&B cannot overwrite a row, so it goes to the summary.
        if self.run and row["epoch"] > self.logged and row["evaluated"]:
            self.use_wandb(f"logging epoch {row['epoch']}", lambda: self.run.log(wandb_row(row)))
        elif self.run and row["epoch"] > self.logged:
            self.use_wandb("noting the epoch cut short", lambda: self.run.summary.update({"cut_short": row}))
        if self.run and row["evaluated"] and utils.best_epoch(self.history, self.opts["monitor"]) is row:
            self.use_wandb("noting the best epoch", lambda: self.run.summary.update(utils.best_summary(row)))
        if self.run and tags != self.tags:  # set as they are raised: a live run can be filtered by them
            self.use_wandb("setting its tags", lambda: setattr(self.run, "tags", self.wandb_tags(tags)))
        self.tags = list(tags)
        self.save("running")
        self.tell_guard("saved", epoch=row["epoch"], tags=self.tags)

    def log_model(self, path: Path, epoch: int, aliases: list[str]) -> None:
        """The model's weights in `path` as a W&B artifact of type model, named after the run (as Lightning's
        WandbLogger and HF's WANDB_LOG_MODEL do), the run's config and the epoch in its metadata; offline it
        lands in the run file, for `wandb sync`. Nothing without a W&B run."""
        if not self.run or self.run.disabled:
            return

        def log() -> None:
            import wandb

            metadata = {"config": files.json_safe(self.config), "epoch": epoch}
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
            artifact.add_file(str(path), name="model.pt")
            self.run.log_artifact(artifact, aliases=aliases)

        self.use_wandb(f"logging the model of epoch {epoch}", log)

    def tell_guard(self, kind: str, **fields) -> None:
        if self.guard:
            self.guard.send(kind, **fields)

    def wandb_tags(self, tags: list) -> tuple:
        """The run's tags: those the user gave W&B (WANDB_TAGS), then the run's own."""
        return tuple(dict.fromkeys([*self.user_tags, *tags]))

    def use_wandb(self, what: str, call: Callable[[], object]) -> None:
        """W&B's service can die mid-run (killed, out of memory) or freeze, and its server can go (a network
        cut, an outage): say what is lost, and go on without it. Training and results.json never depend on
        W&B, and no W&B call waits past W&B's own limits (wandb_start.limit()), nor on a server that is gone."""
        if not self.run:
            return
        server = None if self.run.offline else self.run.settings.base_url
        try:
            wandb_start.within(wandb_start.limit(), call, server)
        except wandb_start.WandbStuck as e:
            lost = "W&B's server was lost" if isinstance(e, wandb_start.WandbServerLost) else "W&B hung"
            # `wandb sync` skips a run begun online unless told
            sync = f"wandb sync {'--include-online ' if server else ''}{self.run.settings.sync_dir}"
            print(
                f"Warning: {lost} while {what} ({wandb_start.stuck}): the run goes on without it. What W&B had, "
                f"its local run files keep (`{sync}` uploads them); results.json holds every epoch and the run's end.",
                file=sys.stderr,
                flush=True,
            )
            self.run = None
        except Exception as e:  # noqa: BLE001 (W&B's own fault, whatever it raises: the run goes on)
            self.lost_wandb(what, e, "The run goes on without it")

    def lost_wandb(self, what: str, e: BaseException, then: str) -> None:
        """W&B failed while `what` (its service has died, most likely): say so and what `then` happens,
        and go on without it."""
        full = isinstance(e, OSError) and e.errno in files.NO_ROOM
        cause = "its disk has no room left" if full else "its service has probably died"
        print(
            f"Warning: W&B failed while {what} ({type(e).__name__}: {str(e).strip()[:200]}): {cause}, and what "
            f"it had not written yet is lost from W&B. {then}; results.json holds every epoch and the run's end.",
            file=sys.stderr,
            flush=True,
        )
        self.run = None
        wandb_start.teardown()  # now, or W&B's exit hook prints the broken link's traceback
        wandb_start.disabled_run()  # a fork's own wandb.log calls go on, into nothing

    def save(self, status: str) -> None:
        """Write results.json; when it cannot be written (a full disk), the run ends here with that reason,
        its previous results.json and checkpoint kept, and RunEnded stops the training loop."""
        if not self.folder:
            return
        unsaved = files.write_failure(
            self.folder / "results.json",
            lambda: save_results(
                self.folder, self.config, self.run_path, self.history, self.tags, status, self.constants
            ),
        )
        if unsaved and status == "running":
            self.finish(self.tags + [utils.SAVE_FAILED()], unsaved)
            raise errors.RunEnded()

    def finish(self, tags: list, message: str | None = None) -> None:
        self.tags = list(dict.fromkeys(tags))
        self.tell_guard("ending", tags=self.tags, message=message)
        failed = utils.failed(self.tags)
        status = "failed" if failed else "finished"
        self.save(status)
        if message:  # before W&B finishes: its Logs tab holds the reason too
            print(f"Error: {message}", file=sys.stderr, flush=True)

        def finish():
            self.run.summary["seed"] = self.config["seed"]
            if best := utils.best_epoch(self.history, self.opts["monitor"]):  # a resumed run's too
                self.run.summary.update(utils.best_summary(best))
            if message:
                self.run.summary["end"] = message
            self.run.tags = self.wandb_tags(self.tags)
            if utils.PREEMPTED() in self.tags:
                self.run.mark_preempting()  # W&B then re-queues a preempted sweep run
            self.run.finish(exit_code=int(failed))

        # W&B's local record (the run file `wandb sync` uploads) is written by its service, which says nothing
        # here when its disk fills: the run would end as if W&B had kept it all.
        local = self.run.settings.sync_dir if self.run and not self.run.disabled else None
        self.use_wandb("finishing the run", finish)
        if local and self.run and (why := files.no_room(local)):  # (self.run: W&B has not said so itself)
            print(
                f"Warning: W&B's run folder {local} has no room left ({why}): W&B's local record of this run "
                "(what `wandb sync` uploads) is likely incomplete."
                + (" results.json holds every epoch." if self.folder else ""),
                file=sys.stderr,
                flush=True,
            )
        # W&B reads its settings once a process: a next run in it (a notebook, the tests) reads them afresh
        wandb_start.teardown()
        # A run resumed with --checkpoint_every 0 keeps the checkpoint an earlier sitting left, to go on from
        checkpointed = self.opts["checkpoint_every"] or (self.folder and (self.folder / "checkpoint.pt").exists())
        resumable = bool(checkpointed) and utils.resumable(self.tags)
        if self.folder and not resumable:
            (self.folder / "checkpoint.pt").unlink(missing_ok=True)
            if not self.opts["save"]:
                remove_run_folder(self.folder)
        if self.opts["verbose"] and self.owner:
            print(
                f"Run {status}. Group {self.config['group']}, seed {self.config['seed']}. "
                f"Tags: {', '.join(self.tags) or 'none'}",
                flush=True,
            )
            if self.folder and (self.opts["save"] or resumable):
                print(f"Saved in {self.folder}" + (": continue it with --resume yes" if resumable else ""), flush=True)
        self.status = int(failed)
        self.tell_guard("ended")

    @classmethod
    def take_over(cls, started: dict, tags: list) -> "Record":
        """In the guard, once the training process has died: the run as it last saved it, its W&B run
        re-opened by its id, ready for finish() to write the end."""
        config, folder = started["config"], started["folder"] and Path(started["folder"])
        history, constants = [], {}
        if folder and (folder / "results.json").exists():
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads((folder / "results.json").read_text())
                history, tags, constants = saved["history"], saved["tags"], saved["constants"]
        record = cls(config, config, folder, history)
        record.tags, record.constants = tags, constants
        if address := started["wandb"]:
            record.user_tags, record.run_path = tuple(address["user_tags"]), address["path"]
            try:
                record.run = wandb_start.start_wandb(
                    id=address["id"],
                    project=address["project"],
                    entity=address["entity"],
                    mode=address["mode"],
                    group=config["group"],
                    resume="allow",
                )
            except errors.StartError as e:
                print(f"Warning: the run's end could not be written to W&B: {e}", file=sys.stderr, flush=True)
            if record.run and record.run.offline and not address["mode"]:  # an online run, its server lost
                print(
                    "Warning: the run's end is logged to W&B offline; once W&B's server is back, "
                    f"`wandb sync --include-online {address['sync_dir']} {record.run.settings.sync_dir}` uploads "
                    "the whole run (what the training process logged, then its end).",
                    file=sys.stderr,
                    flush=True,
                )
            if record.run and not record.run.offline:
                record.use_wandb("logging the epochs W&B's server lacks", record.catch_up)
        return record

    def catch_up(self) -> None:
        """Online, W&B's server may lack the last epochs a killed training process logged: W&B uploads a
        run's history every few seconds and drops what it had not sent when that process dies. The whole
        epochs the server's history lacks are logged again here, from results.json, so that the server
        holds each once. (Offline, the dead process's run file holds them all: W&B flushes it every
        WANDB_FLUSH_INTERVAL.)"""
        held = server_epochs(self.run)
        for row in self.history:
            if row["epoch"] > max(held) and row.get("evaluated"):
                self.run.log(wandb_row(row))
