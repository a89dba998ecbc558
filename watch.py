"""The guard: `python main.py` runs itself again as the training process under this small process
(as torchrun does for its workers), which imports neither torch nor wandb. The training process
owns its run (W&B, the run folder; see runs.py) and tells the guard, through a pipe, how it goes
(`Channel`); the guard forwards stop signals to it, and only when it dies or hangs does the guard
write the run's end itself: results.json's status and tags, and the W&B run, re-opened by its id,
tagged and finished Failed. If the guard dies, the training process is sent SIGTERM and stops as
preempted, resumable.

A SIGTERM is a scheduler's preemption when it reaches every process of the job (SLURM sends it so):
the training process has one of its own, stops as `Preempted`, and says so. One that reaches main.py
alone is a stop: `wandb agent`'s stop command and early termination, and its second Ctrl+C, terminate
the process it started and nothing else (as does `kill PID`). The guard waits TERM_GRACE for the
training process to say it had one too; if it does not, it sends SIGUSR1, and the run ends `Stopped`,
which W&B does not re-queue.

The training process's messages, one JSON object a line, each named by its "kind":
- started: {folder, config, wandb}: the run has begun (data loaded, model built, W&B started);
  folder is the run folder (or null), wandb what re-opens the W&B run (or null);
- epoch: {epoch, started}: an epoch starts, at `started` on the machine's monotonic clock;
- saved: {epoch, tags}: an epoch has ended and is logged and saved (its checkpoint is written next);
- stopping: {tag}: a stop signal reached the training process, which stops at the next batch with this tag;
- ending: {tags}: the run's end is being written, with these tags: stop signals change nothing now;
- ended: {}: the run's end is written; the process's exit status is the run's.
"""

import contextlib
import functools
import json
import math
import os
import select
import signal
import subprocess
import sys
import time

import utils

CHANNEL = "MAIN_PY_GUARD_FD"  # the environment variable that tells the training process where to report
WATCH_GRACE = 2.0  # seconds the guard allows past a deadline before it acts
# Seconds the guard waits for the run folder's lock once training has died: its DataLoader workers hold
# it (they inherit it) until they notice their parent's death, which they check every 5 s.
LOCK_WAIT = 10.0
TERM_GRACE = 2.0  # seconds for the training process to say it had a SIGTERM of its own (a preemption): its
# handler runs between two Python lines, after a long native call (an evaluation batch) on a busy machine


class Channel:
    """The training process's end of the pipe. Never raises: a guard that has died leaves training
    to the SIGTERM Linux sends then (see guard()), not to a broken pipe."""

    def __init__(self):
        fd = os.environ.pop(CHANNEL, None)  # popped: a process the training code starts is not watched
        self.fd = int(fd) if fd else None

    def send(self, kind: str, **fields) -> None:
        """One write a message, unbuffered: a signal handler may send one while another is being sent."""
        if self.fd is not None:
            try:
                os.write(self.fd, json.dumps(utils.json_safe({"kind": kind, **fields})).encode() + b"\n")
            except OSError:
                self.fd = None


def guarded() -> bool:
    """Whether this process is the training process under a guard."""
    return CHANNEL in os.environ


def guard(script: str, argv: list[str], epoch_timeout: float) -> int:
    """Runs `python script argv` as the training process and watches it; returns the run's exit status."""
    read, write = os.pipe()
    watch = Watch(epoch_timeout)
    for signum in utils.STOP_SIGNALS:
        signal.signal(signum, watch.forward)
    try:
        watch.process = subprocess.Popen([sys.executable, script, *argv], env={**os.environ, CHANNEL: str(write)},
                                         pass_fds=(write,), preexec_fn=functools.partial(
                                             utils.stop_with_parent, os.getpid(), signal.SIGTERM))
        os.close(write)  # the training process holds the only writing end: its death closes the pipe
        with os.fdopen(read, "rb", buffering=0) as pipe:
            return watch.follow(pipe)
    finally:
        for signum in utils.STOP_SIGNALS:  # after the run's end a stop signal changes nothing: the exit status is
            signal.signal(signum, signal.SIG_IGN)  # the run's (SIG_IGN: Python restores no handler as it exits)
        if watch.process and watch.process.poll() is None:
            watch.process.kill()


class Watch:
    """Follows the training process: its messages, its death, its silence past --epoch_timeout (a hang in
    native code never reaches the loop's own check). Every wait has a timeout."""

    def __init__(self, epoch_timeout: float):
        self.process, self.started, self.tags, self.ending, self.ended = None, None, [], False, False
        self.deadline, self.stop_tag, self.minutes, self.stop_at = math.inf, None, epoch_timeout, math.inf
        self.timeout = 60 * epoch_timeout + WATCH_GRACE if epoch_timeout else None

    def forward(self, signum, frame):
        if self.ending or not self.process:  # the run's end is being written: a late signal changes nothing
            return
        if signum == signal.SIGINT and self.stop_tag == utils.USER_ABORT():
            print("\nSecond Ctrl+C: ending the run now.", file=sys.stderr, flush=True)
            self.process.kill()
            return
        if self.stop_tag:  # the first stop names the end
            return
        if signum == signal.SIGTERM:  # a preemption or a stop: follow() decides, once the training process has spoken
            self.stop_tag, self.stop_at = utils.STOPPED(), time.monotonic() + TERM_GRACE
            return
        self.stop_tag = utils.STOP_SIGNALS[signum]()
        self.tell(signum)

    def tell(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def follow(self, pipe) -> int:
        buffer, end = b"", None
        while end is None:
            if time.monotonic() > self.stop_at:  # a SIGTERM to main.py alone: a stop, not a preemption
                self.stop_at = math.inf
                self.tell(signal.SIGUSR1)
            wait = min(1.0, max(0.0, min(self.deadline, self.stop_at) - time.monotonic()))
            if select.select([pipe], [], [], wait)[0]:
                data = pipe.read(65536)
                if not data:  # the pipe closed: the training process has ended
                    break
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    self.hear(json.loads(line))
            elif time.monotonic() > self.deadline:
                self.process.kill()
                end = (utils.TIMEOUT(), f"an epoch ran past --epoch_timeout {self.minutes:g} min and did not stop "
                       "by itself: the training process was stuck, and has been killed")
            elif self.process.poll() is not None:  # ended, though a process it started holds the pipe open
                break
        code = self.wait()
        if self.ended or (self.started is None and code >= 0):
            return code  # the run's own end, or a start error the training process has reported itself
        if end is None:
            end = self.death(code)
        if self.started is None:  # killed while its data loaded: there is no run to end yet
            print(f"Error: {end[1]}", file=sys.stderr, flush=True)
            return 1
        return self.take_over(*end)

    def hear(self, message: dict) -> None:
        kind = message["kind"]
        if kind == "started":
            self.started = message
        elif kind in ("saved", "ending"):
            self.tags = message["tags"]
        elif kind == "stopping":  # its own signal: the stop is what it heard
            self.stop_tag, self.stop_at = message["tag"], math.inf
        self.ending |= kind == "ending"
        self.ended = kind == "ended"
        # Once started, the training process reports at least once an epoch: as one starts, as it ends
        # (then its checkpoint is written). Silence past the timeout is a hang.
        since = message["started"] if kind == "epoch" else time.monotonic()
        self.deadline = since + self.timeout if self.timeout and self.started and not self.ending else math.inf

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=WATCH_GRACE)
        except subprocess.TimeoutExpired:  # it closed the pipe but lives on: it cannot be trusted to end
            self.process.kill()
            return self.process.wait()

    def death(self, code: int) -> tuple[str, str | None]:
        if self.stop_tag:  # it was asked to stop (a second Ctrl+C kills it): the stop names the end
            return self.stop_tag, None
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        oom = " (the out-of-memory killer sends SIGKILL)" if code == -signal.SIGKILL else ""
        return utils.CRASHED(), f"the training process {how}{oom} before the end of the run"

    def take_over(self, tag: str, message: str | None) -> int:
        """The run's end, written here: the training process can no longer write it."""
        import runs

        self.ending = True  # from here on, stop signals change nothing
        folder = self.started["folder"]
        lock = None
        try:
            if folder:
                lock = runs.own(runs.Path(folder), wait=LOCK_WAIT)
            run = runs.Record.take_over(self.started, self.tags)
            run.finish(run.tags + [tag], message)
            return run.status
        except utils.StartError as e:
            print(f"Error: {message or tag}. {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            if lock is not None:
                os.close(lock)
