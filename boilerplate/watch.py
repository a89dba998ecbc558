"""The guard: `python main.py` runs itself again as the training process under this small process
(as torchrun does for its workers), which imports neither torch nor wandb. The training process
owns its run (W&B, the run folder; see runs.py) and tells the guard, through a pipe, how it goes
(`Link`); the guard passes stop signals on to it, and only when it dies or hangs does the guard
write the run's end itself: results.json's status and tags, and the W&B run, re-opened by its id,
tagged and finished Failed. If the guard dies, Linux sends the training process a signal (GUARD_DIED)
and it stops as `Stopped`, resumable. Under torchrun each rank's `python main.py` is a guard of its own; the
run's end is rank 0's to write (a rank of several says `owner: false` when it starts; docs/distributed.md),
and torchrun's death stops it as a SIGTERM to main.py alone does (stop_with_torchrun).

Stops. The first cause of a stop names the run's end, and nothing changes it once the end is decided.
- Ctrl+C (SIGINT) reaches both processes (a terminal signals the whole foreground group); the guard
  passes it on too, for a SIGINT to main.py alone. A second Ctrl+C kills training (`User abort`).
- A closed terminal (an ssh session dropped) sends SIGHUP to both: `Hangup`, as Ctrl+C ends a run, its output
  from then on dropped (output.py). Under nohup, which starts main.py ignoring SIGHUP, it is left ignored.
- Ctrl+\\ (SIGQUIT) kills the training process; the guard, outliving it, ends the run as after a second Ctrl+C.
- A SIGTERM that reaches main.py alone is a stop the user asked for: `wandb agent`'s stop command and
  early termination, its second Ctrl+C, `kill PID`. The guard says so at once (GUARD_STOP: `Stopped`,
  not re-queued by W&B). A SIGTERM to every process of the job is a scheduler's preemption (SLURM
  sends it so): the training process has one of its own, and that makes it `Preempted`, whichever
  of the two signals it handles first. The agent's SIGKILL that follows a stop kills the guard: the
  training process then has its stop already, and keeps it.
- SIGUSR1 or SIGUSR2, a scheduler's warning of the job's end (SLURM's --signal=USR1@90), to either process
  or both: `Preempted`, as the job's SIGTERM. The guard's own words are real-time signals, never these.
- Until the run has begun (W&B started, results.json written), a stop ends the training process at
  once, leaving nothing: exit status 130 after Ctrl+C, 129 after SIGHUP, 131 after Ctrl+\\, 143 after the
  others (SIGTERM, SIGUSR1, SIGUSR2). Main.py's first line holds stop signals back until the process can
  act on them, so none is lost and none is a traceback.
- Once the last epoch is saved, or the run's end is being written, stop signals change nothing.

The training process's messages, one JSON object a line, each named by its "kind":
- starting: {folder}: the run folder is made (or null); the guard removes it if training dies before
  the run begins;
- wandb: {seconds}: W&B is starting, and gives up after this long (the guard kills a start that hangs past it);
- started: {folder, config, wandb, owner}: the run has begun (data loaded, model built, W&B started);
  wandb is what re-opens the W&B run (or null); owner, whether this process writes the run (torchrun's
  rank 0, or the one process);
- epoch: {epoch, started}: an epoch starts, at `started` on the machine's monotonic clock;
- saved: {epoch, tags}: an epoch has ended and is logged and saved (its checkpoint is written next);
- stopping: {tag}: a stop signal reached the training process, which stops at the next batch with this tag;
- ending: {tags, message}: the run's end is decided and being written, with these tags (and the error's
  message, or null): stop signals change nothing now, and a death from here on (the out-of-memory killer
  while W&B finishes, say) changes nothing either: the guard writes the decided end itself;
- ended: {}: the run's end is written; the exit status is the run's, however the process leaves after it.
"""

import contextlib
import ctypes
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import argparse

import utils

from . import errors, files, output, wandb_start

CHANNEL = "MAIN_PY_GUARD_FD"  # the environment variable that tells the training process where to report
WATCH_GRACE = 2.0  # seconds the guard allows past an epoch's deadline before it acts
# Seconds it allows past a wait's own limit (W&B's start, rank 0's start under torchrun): training gives up
# first, and says so.
WAIT_GRACE = 10.0
# Seconds the guard waits for the run folder's lock once training has died: its DataLoader workers hold
# it (they inherit it) until they notice their parent's death, which they check every 5 s.
LOCK_WAIT = 10.0
# What the training process exits with before its run began, having said why itself (docs/modes.md): done or
# declined, a start error, a usage error, stopped by Ctrl+C, SIGHUP or SIGTERM. Any other status is news to it too.
SAID_BEFORE_START = (0, 1, 2, 129, 130, 143)
# Seconds within which a SIGTERM of the training process's own turns the guard's "Stopped" into "Preempted":
# a job-wide SIGTERM reaches both processes at once, and the guard's word for it may be handled first.
TERM_GRACE = 2.0
GUARD_STOP = utils.GUARD_STOP  # the guard's word for a SIGTERM that reached main.py alone
GUARD_DIED = utils.GUARD_DIED  # what Linux sends the training process when the guard dies
WORDS = (GUARD_STOP, GUARD_DIED)
# Ctrl+\ (SIGQUIT) kills the training process at once, as Linux's default has it; the guard outlives it, to
# end the run as after a second Ctrl+C (it left results.json `running` for good when it died of it too).
QUIT = signal.SIGQUIT
# The signals from outside, which main.py's first line holds back until the process can act on them (the
# training process holds the guard's words too, from its start: Linux keeps a signal mask across exec).
# Ctrl+\ too: before the guard had its handler, it killed the guard with no word said (under load, 0.2 s in).
HELD = (*(s for s in utils.STOP_SIGNALS if s not in WORDS), QUIT)
# Those this process acts on: nohup starts it ignoring SIGHUP, so that a closed terminal stops nothing, and
# it stays so (the training process inherits the guard's SIG_IGN; a handler Linux resets as it starts it).
HEARD = tuple(s for s in utils.STOP_SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN))
PERSONAL = tuple(s for s in HELD if s in HEARD)  # the guard's
# What stopped a process before its run began, as its last line says: before the run has begun, a
# preemption and a stop end alike (nothing is recorded), so the message names the signal, not a tag.
CAUSES = {
    signal.SIGINT: "Ctrl+C",
    signal.SIGHUP: "a closed terminal (SIGHUP)",
    QUIT: "Ctrl+\\",
    signal.SIGTERM: "SIGTERM",
    signal.SIGUSR1: "SIGUSR1",
    signal.SIGUSR2: "SIGUSR2",
    GUARD_STOP: "SIGTERM",
    GUARD_DIED: "the guard's death",
}


def signal_name(signum: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(signum).name
    return f"signal {signum}"  # a real-time signal has no name of its own


def line_break() -> str:
    """What puts a message on a line of its own: on a terminal, a progress bar (or the ^C a key echoes)
    holds the line; a log file has none, and gets no empty line."""
    return "\n" if sys.stderr.isatty() else ""


def stopped_before_start(signum: int) -> int:
    """Says so; the exit status a shell gives a process that signal ended."""
    print(
        f"{line_break()}Stopped by {CAUSES[signum]} before the run began: nothing was trained, nothing changed.",
        file=sys.stderr,
        flush=True,
    )
    return 128 + (signum if signum in (signal.SIGINT, signal.SIGHUP, QUIT) else signal.SIGTERM)


class Channel:
    """The training process's end of the pipe. Never raises: a guard that has died leaves training
    to the signal Linux sends then (see guard()), not to a broken pipe."""

    def __init__(self):
        fd = os.environ.pop(CHANNEL, None)  # popped: a process the training code starts is not watched
        self.fd = int(fd) if fd else None

    def send(self, kind: str, **fields) -> None:
        """One write a message, unbuffered: a signal handler may send one while another is being sent."""
        if self.fd is not None:
            try:
                os.write(self.fd, json.dumps(files.json_safe({"kind": kind, **fields})).encode() + b"\n")
            except OSError:
                self.fd = None


class StoppedBeforeStart(SystemExit):
    """A stop before the run began, for a caller in this process (see Link): the status a shell gives the
    signal. A SystemExit, so that no `except Exception` in between swallows it."""


class Link:
    """The training process's side of the guard: the messages it sends (`send`, through Channel; without
    a guard they go nowhere) and the stop signals it hears (utils.STOP_SIGNALS), as the module's
    docstring describes. `tag` is the stop asked for, if any; the training loop acts on it at its next
    batch. Use it as a context manager; on leaving, stops change nothing. `listen()` starts hearing
    earlier, before torch loads.

    With `whole_process` (main.py's own process), a stop before the run begins removes the run folder made
    for it (`unstarted`) and ends the process there and then (os._exit): an exception raised from the
    handler would unwind through whatever was running, a half-done `import numpy` say, which a later
    import then reports with a traceback. And after the run, stop signals are ignored to the process's
    end (Python puts its default handlers back as it exits: a late SIGINT would kill it). Otherwise (a
    caller in this process) StoppedBeforeStart is raised, and the previous handlers are put back."""

    EARLY, RUNNING, CLOSED = "early", "running", "closed"

    def __init__(self, channel: Channel | None = None, whole_process: bool = False):
        self.channel, self.tag, self.heard_at, self.phase, self.deferring = channel, None, 0.0, self.EARLY, 0
        self.signum = None  # the first stop signal heard
        self.resumed = -math.inf  # when the process last went on after a suspension (SIGCONT), perf_counter's time
        self.previous, self.whole_process, self.unstarted = None, whole_process, None

    @property
    def requested(self) -> bool:
        return self.tag is not None

    def listen(self) -> "Link":
        if self.previous is None:
            self.previous = {signum: signal.signal(signum, self._handle) for signum in HEARD}
            self.previous[signal.SIGCONT] = signal.signal(signal.SIGCONT, self._resumed)
            # What waited is handled now; a Ctrl+\ kills the process, as Linux's default has it.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (*utils.STOP_SIGNALS, QUIT))
        return self

    def __enter__(self) -> "Link":
        return self.listen()

    def __exit__(self, *exc) -> None:
        self.phase = self.CLOSED
        for signum, handler in (self.previous or {}).items():
            signal.signal(signum, signal.SIG_IGN if self.whole_process else handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.phase == self.CLOSED:
            return
        tag = utils.STOP_SIGNALS[signum]()
        job_wide = (
            self.tag == utils.STOPPED() and signum == signal.SIGTERM and time.monotonic() - self.heard_at < TERM_GRACE
        )
        if self.tag is not None and not job_wide:  # the first cause stands
            return
        self.tag, self.heard_at, self.signum = tag, time.monotonic(), self.signum or signum
        if self.phase == self.EARLY:
            if not self.deferring:
                self.stop_now()
            return
        self.send("stopping", tag=tag)
        if signum in PERSONAL:  # not for the guard's words: a process asked, not a person
            print(f"{line_break()}Stopping at the next batch: {tag}.", file=sys.stderr, flush=True)

    def _resumed(self, signum: int, frame: FrameType | None) -> None:
        self.resumed = time.perf_counter()

    def past(self, deadline: float, span: float) -> bool:
        """Whether perf_counter's time is past `deadline`, `span` seconds after what it times began. A job
        suspended meanwhile (SIGSTOP then SIGCONT: Ctrl+Z then fg, SLURM's suspend and gang scheduling) has
        the whole span again from its resume: the time it stood still is no hang."""
        now = time.perf_counter()
        return now > deadline and now > self.resumed + span

    def stop_now(self) -> NoReturn:
        self.phase = self.CLOSED
        status = stopped_before_start(self.signum)
        if not self.whole_process:
            raise StoppedBeforeStart(status)
        if self.unstarted:
            from . import runs

            runs.remove_if_unstarted(self.unstarted)
        sys.stdout.flush()
        os._exit(status)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A stop before the run begins waits for the end of this block (a run folder being made, W&B
        starting): what it starts is finished, or undone, first."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if self.phase == self.EARLY and self.tag and not self.deferring:
            self.stop_now()

    def begun(self) -> None:
        """The run has begun: from now on a stop is the loop's to act on, at its next batch."""
        if self.phase == self.EARLY:
            self.phase = self.RUNNING
            if self.tag:
                self.send("stopping", tag=self.tag)

    def close(self) -> None:
        """The run's end is decided: stop signals change nothing from now on."""
        self.phase = self.CLOSED

    def send(self, kind: str, **fields) -> None:
        if kind == "ending":
            self.close()
        if self.channel:
            self.channel.send(kind, **fields)


def guarded() -> bool:
    """Whether this process is the training process under a guard."""
    return CHANNEL in os.environ


def interpreter_options() -> list[str]:
    """The options this interpreter was started with (-u, -X dev, -W error, ...), for the training process."""
    return sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]


def debugger() -> str | None:
    """What debugs or profiles this process, if anything: the training code must then run in it, where a
    breakpoint stops, not in a training process the guard starts. An IDE's debugger (debugpy for VS Code,
    pydevd for PyCharm), a trace function (pdb with a breakpoint set, most debuggers), sys.monitoring's
    debugger slot (Python 3.12+), or main.py run by another module: `python -m pdb main.py`, `-m cProfile`."""
    if loaded := [name for name in ("debugpy", "pydevd") if name in sys.modules]:
        return loaded[0]
    options = interpreter_options()  # ["-m", "pdb"] for `python -m pdb main.py`; for `python -m X` alone, X
    for option, following in zip(options, [*options[1:], ""], strict=False):  # is the program, and "-m" is left
        if (option == "-m" and following) or (option.startswith("-m") and len(option) > 2):
            return f"python -m {following if option == '-m' else option[2:]}"
    if sys.gettrace() is not None:
        return "a trace function"
    monitoring = getattr(sys, "monitoring", None)
    if monitoring and (tool := monitoring.get_tool(monitoring.DEBUGGER_ID)):
        return tool
    return None


PR_SET_PDEATHSIG = 1  # prctl(2)


def stop_with_parent(parent: int, signum: int) -> None:
    """In a child process before it starts its program: Linux sends it `signum` when `parent` dies, even by
    SIGKILL, so that it stops cleanly instead of going on unwatched."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call, the child outlives its parent
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the parent died before the call
        os.kill(os.getpid(), signum)


def stop_with_torchrun(guarding: bool) -> None:
    """Under torchrun, in a rank's first process (the guard, or training without one): torchrun's death,
    even by SIGKILL (W&B agent's last resort, local_sweep's second Ctrl+C, `kill -9`), stops the run as a
    SIGTERM to main.py alone does, `Stopped`, resumable. torchrun starts each rank in a session of its own
    and stops none as it dies: until this, they trained on to their last epoch, unwatched."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun for every rank it starts
        return
    word = signal.SIGTERM if guarding else GUARD_STOP  # the guard's own SIGTERM, or its word for one
    signal.pthread_sigmask(signal.SIG_BLOCK, (word,))  # until the process can act on it, as main.py's first line
    stop_with_parent(os.getppid(), word)


def start_training(script: str, argv: list[str], write: int) -> subprocess.Popen:
    guard_pid = os.getpid()

    def prepare():  # in the child, before it runs Python: stop signals held until it can act on them
        signal.pthread_sigmask(signal.SIG_BLOCK, utils.STOP_SIGNALS)
        stop_with_parent(guard_pid, GUARD_DIED)

    return subprocess.Popen(
        [sys.executable, *interpreter_options(), script, *argv],
        env={**os.environ, CHANNEL: str(write)},
        pass_fds=(write,),
        preexec_fn=prepare,
    )


def guard(script: str, argv: list[str], epoch_timeout: float) -> int:
    """Runs `python script argv` as the training process and watches it; returns the run's exit status."""
    read, write = os.pipe()
    watch = Watch(epoch_timeout)
    for signum in (*PERSONAL, QUIT, signal.SIGCONT):
        signal.signal(signum, watch.heard)
    signal.set_wakeup_fd(watch.wake[1])  # a signal wakes the loop's select at once
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (*PERSONAL, QUIT))  # held since main.py's first line
    try:
        for signum in watch.take_signals():
            watch.act(signum)
        if watch.stop_tag:  # stopped before training could start
            return watch.stopped_before_start()
        watch.process = start_training(script, argv, write)
        os.close(write)  # the training process holds the only writing end: its death closes the pipe
        return watch.follow(read)
    finally:
        for signum in (*PERSONAL, QUIT, signal.SIGCONT):  # after the run's end a stop signal changes nothing: the
            signal.signal(signum, signal.SIG_IGN)  # exit status is the run's (SIG_IGN: Python restores none)
        if watch.process and watch.process.poll() is None:
            watch.process.kill()


class Watch:
    """Follows the training process: its messages, its death, its silence past --epoch_timeout (a hang in
    native code never reaches the loop's own check) or past W&B's start. Signals are acted on in the loop,
    after every message already sent has been read: a stop that comes after the last epoch was saved (or
    the end began) changes nothing. Every wait has a timeout."""

    def __init__(self, epoch_timeout: float):
        self.process, self.started, self.tags, self.ending, self.ended = None, None, [], False, False
        self.deadline, self.stop_tag, self.minutes, self.folder = math.inf, None, epoch_timeout, None
        self.span = math.inf  # how long the deadline allowed when it was set
        self.timeout = 60 * epoch_timeout + WATCH_GRACE if epoch_timeout else None
        self.signals, self.hung = [], None  # signals not yet acted on; why training was killed as hung
        self.decided = None  # the end the training process decided and began to write ("ending")
        self.acted = False  # whether the guard has acted on a stop signal of its own
        self.first = None  # the signal that first stopped it
        self.wake = os.pipe()
        for fd in self.wake:
            os.set_blocking(fd, False)

    def heard(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def take_signals(self) -> list[int]:
        signals, self.signals = self.signals, []
        return signals

    def act(self, signum: int) -> None:
        if signum == signal.SIGCONT:  # the job was suspended, this process with it: the time it stood still is
            self.deadline = max(self.deadline, time.monotonic() + self.span)  # no hang (Link.past)
            return
        if self.ending:  # the last epoch is saved, or the run's end is being written: a late signal changes nothing
            return
        acted_before, self.acted = self.acted, True
        if signum == QUIT:  # the training process has its own, and dies of it: the run ends now, as it began
            self.stop_tag, self.first = self.stop_tag or utils.USER_ABORT(), self.first or signum
            self.end_now("Ctrl+\\")
            return
        if self.stop_tag:  # the first stop names the end; Ctrl+C after one the guard heard ends it now
            # Not after one the training process alone has reported: a Ctrl+C reaches both processes, and
            # its "stopping" may be read before the guard acts on its own copy of the same signal.
            if signum == signal.SIGINT and acted_before:
                self.end_now("Ctrl+C again")
            return
        # A SIGTERM here may be the job's (the training process then says Preempted) or main.py's alone: Stopped.
        word = GUARD_STOP if signum == signal.SIGTERM else signum
        self.stop_tag, self.first = utils.STOP_SIGNALS[word](), signum
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(word)

    def end_now(self, why: str) -> None:
        if self.process:
            print(f"{line_break()}{why}: ending the run now.", file=sys.stderr, flush=True)
            self.process.kill()

    def stopped_before_start(self) -> int:
        self.remove_unstarted()
        return stopped_before_start(self.first)

    def remove_unstarted(self) -> None:
        """What the training process made for a run that never began (its folder) goes with it."""
        if self.folder:
            from . import runs

            runs.remove_if_unstarted(runs.Path(self.folder))

    def follow(self, read: int) -> int:
        os.set_blocking(read, False)
        buffer, closed = b"", False
        while not closed:
            wait = min(1.0, max(0.0, self.deadline - time.monotonic()))
            select.select([read, self.wake[0]], [], [], wait)
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake[0], 4096)
            # Signals are taken before the pipe is read: every message sent before one of them is heard first.
            signals = self.take_signals()
            while True:
                try:
                    data = os.read(read, 65536)
                except BlockingIOError:
                    break
                if not data:  # the pipe closed: the training process has ended
                    closed = True
                    break
                *lines, buffer = (buffer + data).split(b"\n")
                for line in lines:
                    self.hear(json.loads(line))
            for signum in signals:
                self.act(signum)
            if time.monotonic() > self.deadline:
                self.process.kill()
                self.hung = self.hang()
                break
            if self.process.poll() is not None:  # ended, though a process it started holds the pipe open
                break
        os.close(read)
        return self.end(self.wait())

    def hang(self) -> tuple[str, str]:
        if self.started is None:
            return utils.TIMEOUT(), (
                "W&B's start outlasted its limit and did not give up by itself: the training "
                "process was stuck, and has been killed"
            )
        return utils.TIMEOUT(), (
            f"an epoch ran past --epoch_timeout {self.minutes:g} min and did not stop by itself: "
            "the training process was stuck, and has been killed"
        )

    def end(self, code: int) -> int:
        if self.ended:  # killed as it left, after its run's end was written: that end's status
            return int(utils.failed(self.tags)) if code < 0 else code
        if self.started is None and code in SAID_BEFORE_START and not self.hung:
            return code
        if self.decided and self.started and not self.hung:
            return self.write_decided(code)
        tag, message = self.hung or self.death(code)
        if self.started is None:  # no run to end yet: what was made for it goes
            if message is None:
                return self.stopped_before_start()
            print(f"Error: {message} before the run began: nothing was trained.", file=sys.stderr, flush=True)
            self.remove_unstarted()
            return 1
        if not self.started.get("owner", True):  # one rank of several under torchrun: rank 0's guard writes the run
            if self.ending and not self.hung:  # after its last epoch, agreed by every rank: its part is done
                # (rank 0 may have written the end before this rank said so): the job's status is rank 0's
                rank = os.environ.get("RANK")
                print(f"Warning: {message or tag} after its last epoch (rank {rank}).", file=sys.stderr, flush=True)
                return 0
            print(f"Error: {message or tag} (rank {os.environ.get('RANK')}).", file=sys.stderr, flush=True)
            return 1
        return self.take_over(tag, message and f"{message} before the end of the run")

    def hear(self, message: dict) -> None:
        kind = message["kind"]
        if kind == "starting":
            self.folder = message["folder"]
        elif kind == "started":
            self.started = message
        elif kind in ("saved", "ending"):
            self.tags = message["tags"]
            self.decided = message if kind == "ending" else self.decided
        elif kind == "stopping" and not self.ending:  # its own signal: the stop is what it heard
            self.stop_tag = message["tag"]
        final = kind == "saved" and self.started and message["epoch"] >= self.started["config"]["epochs"]
        self.ending |= kind == "ending" or bool(final)
        self.ended |= kind == "ended"
        # Once started, the training process reports at least once an epoch: as one starts, as it ends
        # (then its checkpoint is written). Silence past the timeout is a hang; so is a wait past its own limit
        # (W&B's start; under torchrun, the other ranks' wait for rank 0's).
        if kind == "waiting":
            self.span = message["seconds"] + WAIT_GRACE
            self.deadline = time.monotonic() + self.span
        elif self.started or kind == "started":
            since = message["started"] if kind == "epoch" else time.monotonic()
            self.span = self.timeout if self.timeout and not self.ending else math.inf
            self.deadline = since + self.span

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=WATCH_GRACE)
        except subprocess.TimeoutExpired:  # it closed the pipe but lives on: it cannot be trusted to end
            self.process.kill()
            return self.process.wait()

    def death(self, code: int) -> tuple[str, str | None]:
        if self.stop_tag:  # it was asked to stop (a second Ctrl+C kills it): the stop names the end
            return self.stop_tag, None
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with status {code}"
        oom = " (the out-of-memory killer sends SIGKILL)" if code == -signal.SIGKILL else ""
        return utils.CRASHED(), f"the training process {how}{oom}"

    def write_decided(self, code: int) -> int:
        """The training process died while writing the end it had decided: the run trained and was judged,
        so that end stands (a crash now would flip a finished run to failed), written here."""
        how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with status {code}"
        print(
            f"Warning: the training process {how} while writing the run's end: the guard writes it.",
            file=sys.stderr,
            flush=True,
        )
        if not self.started.get("owner", True):  # rank 0's guard writes the run
            return int(utils.failed(self.decided["tags"]))
        return self.take_over(None, self.decided.get("message"))

    def take_over(self, tag: str | None, message: str | None) -> int:
        """The run's end, written here: the training process can no longer write it. `tag` is what ended
        it (a crash, a hang), added to the tags it had saved; None for the end it had decided."""
        from . import runs

        self.ending = True  # from here on, stop signals change nothing
        print(line_break(), end="", file=sys.stderr)  # the dead process's progress bar holds the line
        folder = self.started["folder"]
        lock = None
        try:
            if folder:
                lock = runs.own(runs.Path(folder), wait=LOCK_WAIT)
            run = runs.Record.take_over(self.started, self.tags)
            run.finish(run.tags + [tag] if tag else self.decided["tags"], message)
            return run.status
        except errors.StartError as e:
            print(f"Error: {message or tag}. {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            if lock is not None:
                os.close(lock)


def in_ipython() -> bool:
    """Whether main.py runs in an IPython session: a Jupyter notebook's kernel or IPython's shell, by
    `%run main.py`. The session goes on after the run, with its own streams, signals and process."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and ipython.get_ipython() is not None


def begin(script: str, parser: "argparse.ArgumentParser") -> "Link":
    """The start of `python main.py`, before torch loads: parses the command line (so that --help and a
    usage error answer at once), then either becomes the guard, which runs `script` again as the training
    process and exits with the run's status, or, in the training process (or under a debugger, where a
    breakpoint must stop in this process), returns the Link that hears stop signals."""
    if in_ipython():
        # The signals main.py's first line held back are the session's again at once (the kernel's
        # interrupt button sends SIGINT): a --help or a usage error ends the run here. Its streams stay as
        # they are (a kernel's cannot be reconfigured, and no reader of them goes away), a stop before the
        # run begins raises instead of ending the process, and the session's handlers come back after it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        if parser.parse_args().watchdog:
            print("In IPython: training in this process, without the guard (as --watchdog no).", file=sys.stderr)
        return Link(Channel()).listen()
    sys.stdout.reconfigure(line_buffering=True)  # a log file gets each line as it is printed, as a terminal does
    output.outlive_readers()  # a reader gone (`| tee` ended by the same Ctrl+C, a closed terminal) ends no run
    args = parser.parse_args()
    debugged = args.watchdog and not guarded() and debugger()
    if not guarded():
        stop_with_torchrun(guarding=bool(args.watchdog and not debugged))
    if debugged:
        print(
            f"Debugging ({debugged}): training in this process, without the guard (as --watchdog no).",
            file=sys.stderr,
            flush=True,
        )
    elif args.watchdog and not guarded():  # this process becomes the guard, and never loads torch
        wandb_start.exit(guard(script, sys.argv[1:], args.epoch_timeout))
    # The training process: from here a stop before the run begins ends it at once (see Link).
    return Link(Channel(), whole_process=True).listen()
