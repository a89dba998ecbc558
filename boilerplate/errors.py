"""The errors that end a start or a run told apart by type, and how one is shown to the user."""


class StartError(Exception):
    """The run cannot start (no data, no place to save, no W&B); the message says what to do."""


def described(e: BaseException) -> str:
    """An exception as a user reads it in one line: its type and its own message, whole (up to 300 characters)."""
    return f"{type(e).__name__}: {' '.join(line.strip() for line in str(e).splitlines())[:300] or 'no message'}"


class UsageError(StartError):
    """A command-line value that only the data rules out: exit status 2, as for any usage error."""


class RunEnded(Exception):
    """The run has ended early and its end is written (results.json could not be saved): raised
    through the training loop to stop it."""
