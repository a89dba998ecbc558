"""W&B's start, which must never hang a run nor blame it for W&B's own faults.

start_wandb() is wandb.init with three guards around it:
- W&B's server unreachable (a gateway answering for it that it is down counts): one plain HTTP request
  says so at once, and the run logs offline (wandb.init would retry until its init timeout). A server
  that answers and refuses the run (the key may not log to its entity) is a StartError: `wandb sync` would
  be refused the same;
- W&B failing by itself (its service, wandb-core, dying as it starts or just after): one more try,
  then the run goes on without W&B, with a warning naming W&B's error;
- W&B hanging: the start runs in a thread with a time limit (`limit()`), and so does every later call
  of the run's (runs.Record.use_wandb); past it, W&B is given up for this process (`stuck`), which then
  leaves with os._exit (exit()), as W&B's threads and exit hooks would hang it. The guard (watch.py)
  kills a training process whose W&B start outlasts that limit by far, as a backstop;
- W&B's server gone mid-run: a later call that waits on it (the finish's uploads, which W&B retries for
  far longer than the limit) is given up as soon as the server cannot be reached (WandbServerLost).
prepare() comes before all that, before the data loads: W&B's settings, room for its run, and its login
prompt (an online run on a terminal or in a notebook, no key found; log_in(), log_in_notebook()): a
person's answer has no time limit, and a Ctrl+C (the kernel's interrupt button) at it ends the run before
it began.
Errors of the user's setup (no login, a WANDB_MODE W&B rejects, a WANDB_DIR that cannot be written)
are a StartError before any epoch, naming W&B's own message.

wandb.setup() is never called: in wandb 0.31, when wandb-core dies before it has said where it listens,
setup() deadlocks on its own lock (see docs/robustness.md, its fault table). wandb.init() alone does not.
"""

import contextlib
import logging
import os
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import errors, files

if TYPE_CHECKING:  # imported by the runs that log, as they start
    import wandb

WANDB_INIT_TIMEOUT = 15.0  # seconds W&B's server has to answer before the run logs offline instead
# W&B's service buffers the run file and flushes it every 15 s; when the process it serves dies (killed,
# out of memory) it drops what it had not flushed. It notices a death within about 0.1 s: flushing
# more often than that keeps every epoch logged before the death.
WANDB_FLUSH_INTERVAL = 0.02
# Seconds between W&B's uploads of a run's history (W&B's own default is 15): an epoch's row reaches the
# server (and the live charts) within 2 s of its end, and a job killed whole (the guard too, which
# otherwise uploads what the server lacks) loses at most 2 s of rows. It costs at most one request
# every 2 s while there is something to send.
WANDB_UPLOAD_INTERVAL = 2.0
WANDB_PROBE_TIMEOUT = 5.0  # seconds W&B's server has to answer a plain HTTP request before wandb.init
WANDB_SERVICE_WAIT = 30.0  # W&B's own limit on wandb-core's start (WANDB_X_SERVICE_WAIT changes it)
SPARE = 10.0  # seconds allowed past W&B's own limits before its start counts as hung
# A W&B call that has waited this long on an online run asks whether W&B's server is still there (and again
# as often while it waits): W&B retries an upload to a server that has gone (a network cut, an outage) for
# far longer than limit(), and its local run file already holds everything, so there is nothing to wait for.
WANDB_SERVER_CHECK = 10.0
# The longest the training process's main thread waits on a W&B call without running Python. Linux hands a
# process's signal to any of its threads, and Python runs the handler in the main thread only once it runs
# Python again: a job's SIGTERM whose C half ran in W&B's thread would otherwise be heard when W&B answers,
# seconds after the guard's word, too late for watch.TERM_GRACE to pair them (Preempted, not Stopped).
SIGNAL_WAIT = 0.1

stuck: str | None = None  # why W&B is given up in this process, once a call to it has hung


class WandbStuck(Exception):
    """A W&B call outlasted limit(): its thread may hold W&B's locks for good."""


class Refused(Exception):
    """W&B's server answered wandb.init in time, refusing the run (a key that may not log to its entity: 403,
    "permission denied"; a key it does not know: 401): a setting to fix, not a server to wait for."""


class WandbServerLost(WandbStuck):
    """A W&B call waits on W&B's server, which can no longer be reached: the same as stuck, sooner."""


def seconds_from(variable: str, default: float) -> float:
    with contextlib.suppress(ValueError):  # W&B itself refuses a bad value, as a start error
        return float(os.environ.get(variable) or default)
    return default


def limit() -> float:
    """The most W&B's start may take, all its tries together, and the most any later W&B call may: its
    service's start and its server's answer, twice, and some spare."""
    return (
        2
        * (
            seconds_from("WANDB_X_SERVICE_WAIT", WANDB_SERVICE_WAIT)
            + seconds_from("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT)
        )
        + SPARE
    )


def within(seconds: float, call: Callable[[], Any], server: str | None = None) -> Any:
    """call()'s result (or its exception), from a thread given `seconds`. Past them W&B is given up in
    this process (`stuck`), and WandbStuck raised: the thread may hold W&B's locks for good. With the
    `server` an online run talks to: sooner, WandbServerLost, once the call has waited WANDB_SERVER_CHECK
    and the server cannot be reached."""
    global stuck
    thread, outcome = in_a_thread(call)
    deadline = time.monotonic() + seconds
    join(thread, min(seconds, WANDB_SERVER_CHECK) if server else seconds)
    while server and thread.is_alive() and time.monotonic() < deadline:
        if why := unreachable(server):
            stuck = f"{server} is unreachable: {why}"
            raise WandbServerLost(stuck)
        join(thread, min(deadline - time.monotonic(), WANDB_SERVER_CHECK))
    if thread.is_alive():
        stuck = f"no answer within {seconds:g} s"
        raise WandbStuck(stuck)
    return outcome.get()


class Outcome:
    """What a call in another thread returned or raised, once it has."""

    value: Any = None
    error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def in_a_thread(call: Callable[[], Any]) -> tuple[threading.Thread, Outcome]:
    """call(), started in a daemon thread (W&B's may hang for good: the process must still be able to leave)."""
    outcome = Outcome()

    def run():
        try:
            outcome.set(call())
        except BaseException as e:  # noqa: BLE001 (handed to the caller, whatever it is)
            outcome.set(error=e)

    thread = threading.Thread(target=run, name="wandb-start", daemon=True)
    thread.start()
    return thread, outcome


def join(thread: threading.Thread, seconds: float) -> None:
    """thread.join(seconds), in slices of SIGNAL_WAIT: the stop signals of the process are heard meanwhile."""
    end = time.monotonic() + seconds
    while thread.is_alive() and (left := end - time.monotonic()) > 0:
        thread.join(min(left, SIGNAL_WAIT))


# What a gateway in front of W&B's server answers while the server behind it is down (an outage): W&B
# retries these as it retries a refused connection. Any other HTTP answer, an error status too, means the
# server itself is there.
SERVER_DOWN = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def unreachable(url: str) -> str | None:
    """Why W&B's server at `url` cannot be reached, if it cannot (a gateway answering for it that it is
    down counts). Through the proxies the environment names, as W&B's own."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=WANDB_PROBE_TIMEOUT).close()
    except urllib.error.HTTPError as e:
        e.close()
        return f"it answers {e.code} {SERVER_DOWN[e.code]}" if e.code in SERVER_DOWN else None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def prepare(stopped: Callable[[], bool] = lambda: False) -> "wandb.Settings":
    """What W&B's start needs, checked before the data loads: settings W&B accepts, room for its run
    (check_folder; W&B's disabled mode writes nothing), and its key where W&B would ask a person for it on
    a terminal (log_in), outside the start's time limit. The settings, for log_in_notebook."""
    import wandb

    try:
        found = read_settings(wandb)
    except user_errors(wandb) as e:
        raise setup_error(e, wandb) from None
    if found.mode != "disabled":
        check_folder()
    log_in(wandb, found, stopped)
    return found


def log_in(wandb: Any, found: "wandb.Settings", stopped: Callable[[], bool]) -> None:
    """W&B's login, where W&B would ask a person for its API key: a run to log online, on a terminal (W&B asks
    only where its input and its messages both are one), and no key found. It comes before the start, which
    has limit() for all it does: a person's answer takes what it takes (copying a key from the browser),
    and a start still waiting on it would be given up as hung. A stop meanwhile (`stopped()`: a Ctrl+C at
    the prompt) ends the wait at once, the terminal's settings put back (the key's prompt hides what is
    typed), for the caller to end the run before it began. Answered "Don't visualize my results", the run
    logs offline, as W&B has it."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return
    try:
        if not asks_for_key(found):
            return
        terminal = termios.tcgetattr(sys.stdin)
        thread, outcome = in_a_thread(lambda: wandb.login(verify=False))  # a wrong key: the start says so
        while thread.is_alive() and not stopped():
            thread.join(SIGNAL_WAIT)  # in slices: the stop signals are heard meanwhile
        if not thread.is_alive() and isinstance(outcome.error, (KeyboardInterrupt, OSError)):
            # The prompt's input ended (Ctrl+D: W&B says KeyboardInterrupt) or its terminal is gone (EIO): a
            # closed terminal's SIGHUP, sent as it closes, may be a moment behind, and names the run's end then.
            end = time.monotonic() + HANGUP_WAIT
            while not stopped() and time.monotonic() < end:
                time.sleep(SIGNAL_WAIT)
            if not stopped():
                raise unanswered(outcome.error)
        if stopped():  # the caller ends the run; the prompt goes with the process
            with contextlib.suppress(termios.error):  # a closed terminal has no settings to put back
                termios.tcsetattr(sys.stdin, termios.TCSADRAIN, terminal)
            return
        outcome.get()
    except user_errors(wandb) as e:
        raise setup_error(e, wandb) from None


def log_in_notebook(found: "wandb.Settings") -> None:
    """W&B's login in a Jupyter notebook (`%run main.py`), where W&B asks through the notebook: its kernel's
    input is no terminal, which log_in leaves alone. Before the start, for the same reason: a first run's
    key was lost, the start given up as hung while the person copied it. In this thread, and the caller
    defers no stop meanwhile: the kernel's interrupt button (SIGINT) then raises from the kernel's own wait
    for the answer (watch.StoppedBeforeStart), which a thread's wait would never leave. Where W&B cannot ask
    (a notebook run with no one at it, by papermill, say), W&B's own error says so."""
    import wandb

    if sys.stdin.isatty() or not asks_for_key(found):
        return
    try:
        wandb.login(verify=False)  # a wrong key: the start says so
    except user_errors(wandb) as e:
        raise setup_error(e, wandb) from None
    # Ctrl+D (W&B says KeyboardInterrupt); a notebook run that takes no input (IPython's StdinNotImplementedError)
    except (KeyboardInterrupt, EOFError, NotImplementedError) as e:
        raise unanswered(e) from None


def asks_for_key(found: "wandb.Settings") -> bool:
    """Whether W&B's start would ask a person for its key: a run to log online, no key found, and W&B's server
    reachable (unreachable, the start logs offline, and says so: no key to ask for)."""
    return found.mode in ONLINE and not found.silent and not key_found(found) and not unreachable(found.base_url)


def unanswered(error: BaseException) -> errors.StartError:
    """W&B's login prompt left without a key: its input ended (W&B says KeyboardInterrupt), or failed."""
    why = "its input ended" if isinstance(error, (KeyboardInterrupt, EOFError)) else errors.described(error)
    return errors.StartError(
        f"W&B's login was left unanswered ({why}).\nLog in with `wandb login`, or run with "
        "WANDB_MODE=offline (upload later with `wandb sync`)."
    )


ONLINE = ("online", "shared", "run")  # W&B's modes that log to its server
HANGUP_WAIT = 1.0  # seconds a closed terminal's SIGHUP may come after its prompt has failed


def key_found(settings: "wandb.Settings") -> bool:
    """Whether W&B has a key for its server without asking for one: in one of the places wandb.login's
    documentation lists (WANDB_API_KEY, an identity token file, the api_key setting, the .netrc file's
    entry for the server, or for api.wandb.ai, behind W&B's default server). A .netrc that cannot be read
    counts as found: W&B's start then goes as it would have."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or settings.api_key:
        return True
    try:
        entries = netrc.netrc(Path(os.environ.get("NETRC") or "~/.netrc").expanduser())
    except FileNotFoundError:
        return False
    except (netrc.NetrcParseError, OSError, RuntimeError):  # RuntimeError: no home folder to look in
        return True
    return any(entries.authenticators(host) for host in (urlsplit(settings.base_url).netloc, "api.wandb.ai"))


def any_key(wandb: Any) -> bool:
    """key_found(), settings W&B refuses counting as found (the fault is then theirs, not the key's)."""
    try:
        return key_found(read_settings(wandb))
    except Exception:  # noqa: BLE001 (any refusal of W&B's settings)
        return True


def user_errors(wandb: Any) -> tuple[type[BaseException], ...]:
    """W&B's errors that are the user's setup's to fix: no login, a rejected key, a setting W&B refuses."""
    return (wandb.errors.UsageError, wandb.errors.AuthenticationError, ValueError)


def start_wandb(prepare: Callable[["wandb.Run"], "wandb.Run"] = lambda run: run, **init: Any) -> "wandb.Run | None":
    """wandb.init(**init) then prepare(run), as described above: the run, or None when W&B failed by
    itself (it has said so). `prepare` is part of the start: W&B dying just after init fails there."""
    import wandb  # only runs that log pay for its import

    # W&B sends usage analytics of its own to its server (OpenTelemetry), and their exporter prints each
    # failed send on the screen: a server that is down would fill the run's log with W&B's retries, where
    # our one warning says what it means for the run.
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
    try:
        settings = {
            "x_transaction_log_flush_interval": WANDB_FLUSH_INTERVAL,
            "x_file_stream_transmit_interval": WANDB_UPLOAD_INTERVAL,
        }
        if not os.environ.get("WANDB_INIT_TIMEOUT"):  # W&B's own 90 s would keep training waiting
            settings["init_timeout"] = WANDB_INIT_TIMEOUT
        init["settings"] = wandb.Settings(**settings)
        defaults = read_settings(wandb)
    except user_errors(wandb) as e:
        raise setup_error(e, wandb) from None
    if (init.get("mode") or defaults.mode) != "disabled":  # W&B's disabled mode writes nothing
        check_folder()
    if (init.get("mode") or defaults.mode) == "online" and (why := unreachable(defaults.base_url)):
        print(
            f"Warning: W&B's server {defaults.base_url} is unreachable ({why}); logging offline instead. "
            "Upload later with `wandb sync`.",
            file=sys.stderr,
        )
        init["mode"] = "offline"

    def attempt():
        began = time.monotonic()
        try:
            run = wandb.init(**init)
        except wandb.errors.CommError as e:  # W&B's server unreachable: nothing is lost offline
            # unless it answered in W&B's time, and refused the run: `wandb sync` would be refused the same
            answered = time.monotonic() - began < seconds_from("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT)
            if answered and not unreachable(defaults.base_url):
                raise Refused(str(e).splitlines()[0]) from None
            print(
                f"Warning: W&B is unreachable ({str(e).splitlines()[0]}); logging offline instead. Upload "
                "later with `wandb sync`.",
                file=sys.stderr,
            )
            wandb.teardown()  # W&B's service still holds the run id of the attempt
            run = wandb.init(**{**init, "mode": "offline"})
        return prepare(run)

    deadline = time.monotonic() + limit()  # for every try together: the guard allows no more
    for last in (False, True):
        try:
            return within(max(0.0, deadline - time.monotonic()), attempt)
        except user_errors(wandb) as e:
            raise setup_error(e, wandb) from None
        except Refused as e:
            raise errors.StartError(
                f"W&B's server refused the run ({e}).\nCheck your W&B key (`wandb login --relogin`), and that it "
                "may log to the run's entity (WANDB_ENTITY, else your default one) and project."
            ) from None
        except WandbStuck:
            print(
                f"Warning: W&B's start hung ({stuck}): the run goes on without W&B. Its results are on screen "
                "and in results.json (--save yes).",
                file=sys.stderr,
                flush=True,
            )
            return None
        except Exception as e:  # noqa: BLE001 (W&B's own fault: its service died, its connection broke)
            print(
                f"Warning: W&B failed as it started ({errors.described(e)})"
                + (
                    "; the run goes on without W&B. Its results are on screen and in results.json (--save yes)."
                    if last
                    else "; trying once more."
                ),
                file=sys.stderr,
                flush=True,
            )
            if last:
                return None
            end_services()  # first: one that does not answer (frozen) would hold the teardown too
            if not teardown(wandb, max(0.0, deadline - time.monotonic())):
                return None
    return None


def read_settings(wandb: Any) -> "wandb.Settings":
    """W&B's settings as wandb.init and wandb.Api read them (the mode, the server), from the environment
    and `wandb login`'s file."""
    found = wandb.Settings()
    found.update_from_system_settings()
    found.update_from_env_vars(dict(os.environ))
    return found


def setup_error(e: BaseException, wandb: Any) -> errors.StartError:
    """W&B's refusal to start, with advice: the offline mode only where the fault is the key (none found, or
    refused by W&B's server), which the offline mode needs none of; any other fault is a setting that would
    fail offline too (a WANDB_PROJECT W&B refuses, say)."""
    refused = isinstance(e, wandb.errors.AuthenticationError)
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not (refused or not any_key(wandb)):
        return errors.StartError(f"W&B could not start ({errors.described(e)}).\nCheck W&B's WANDB_ variables.")
    login = "Log in with `wandb login`, or run" if refused else "Run"
    return errors.StartError(
        f"W&B could not start ({errors.described(e)}).\n{login} with WANDB_MODE=offline "
        "(upload later with `wandb sync`)."
    )


def lost_under(e: BaseException) -> bool:
    """Whether `e` is W&B lost under a W&B call, raised through W&B's own code: its connection to its service
    (the service died: a ConnectionError), or, once W&B has hung in this process (`stuck`: no run can start
    now, not even a disabled one), W&B refusing the call (wandb.log before wandb.init). The run's own W&B
    calls are guarded (runs.use_wandb); one that escapes the training code came from a call of the fork's
    own (wandb.log in the loop, say)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or not isinstance(e, (ConnectionError, wandb.Error) if stuck else ConnectionError):
        return False
    package = Path(wandb.__file__).parent
    return any(Path(frame.filename).is_relative_to(package) for frame in traceback.extract_tb(e.__traceback__))


def disabled_run() -> "wandb.Run | None":
    """W&B's own way to log nothing (mode "disabled"), so that a fork's wandb.log calls work without W&B
    too; None where W&B has hung in this process (starting one would wait on W&B's lock for good)."""
    import wandb

    if stuck:
        return None
    try:
        return within(limit(), lambda: wandb.init(mode="disabled"))
    except WandbStuck:
        pass
    except Exception as e:  # noqa: BLE001 (no run at all then: a fork's wandb.log raises, as in any W&B script)
        print(
            f"Warning: W&B's disabled run could not start ({errors.described(e)}): a wandb.log of your own will fail.",
            file=sys.stderr,
            flush=True,
        )
    return None


def teardown(wandb: Any = None, seconds: float | None = None) -> bool:
    """W&B's service and state, ended so that a next wandb.init starts afresh (a next run in this process
    reads its settings anew, a broken service is replaced). False when W&B hangs doing it."""
    wandb = wandb or sys.modules.get("wandb")
    if stuck or wandb is None:
        return not stuck
    try:
        within(limit() if seconds is None else seconds, wandb.teardown)
    except WandbStuck:
        return False
    # A service already dead: nothing left to end. W&B's teardown then calls sys.exit with the service's exit
    # status (-9 for one end_services killed): that is W&B's news of its service, not this process's end.
    except (Exception, SystemExit):  # noqa: BLE001
        pass
    return True


def check_folder() -> None:
    """W&B's folder (WANDB_DIR, else ./wandb) can hold the run: its service would write nothing to a full disk
    without a word to the run, and the run end as if W&B had kept it all."""
    if os.environ.get("WANDB_DIR"):  # W&B would fall back to a temporary folder, which a reboot may empty
        check_writable(os.environ["WANDB_DIR"], "WANDB_DIR")
    elif why := files.no_room(os.getcwd()):
        raise errors.StartError(
            f"no room for W&B's run in {Path.cwd() / 'wandb'} ({why}): free some, or set WANDB_DIR to a folder "
            "that has room."
        )


def check_writable(path: str, what: str = "--output_path") -> None:
    """Fail before training, not after it, when results could not be saved: a folder that cannot be made
    or written, or a disk with no room left (full, or the user's quota spent)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        files.room(path)
    except OSError as e:
        raise errors.StartError(f"cannot save under {what} {path}: {e.strerror or e}") from None


def end_services() -> None:
    """Ends the W&B services (wandb-core) this process started and no longer uses: one that hung or never
    answered would outlive the run, holding its output (a pipe, a log) open. Linux only (it reads /proc)."""
    import signal
    from pathlib import Path

    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            program = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if parent == os.getpid() and program.endswith(b"wandb-core"):
                os.kill(int(entry.name), signal.SIGKILL)


def exit(status: int) -> NoReturn:
    """sys.exit(status), or, once W&B has hung in this process, os._exit: its threads and exit hooks
    would hang the exit (and its service is ended, not left behind)."""
    if stuck:
        end_services()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
