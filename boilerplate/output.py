"""stdout and stderr that outlive whoever reads them. What a run prints is for a person watching; what it
did is in W&B and the run folder. When the reader goes first (`python main.py | tee log` and Ctrl+C, which
ends tee at once; `| head`; a terminal that closes), each write fails (EPIPE from a pipe with no reader,
EIO from a terminal hung up), and such a failure, met wherever the run prints next, must not become the
run's end (it was a traceback and `W&B lost` for a Ctrl+C). From the first such failure on, the stream
writes to /dev/null instead, and the run goes on to the end it earned."""

import errno
import os
import sys
from typing import TextIO

GONE = (errno.EPIPE, errno.EIO)  # the reader has gone: a pipe's, a terminal's


class Outliving:
    """A text stream (sys.stdout, sys.stderr) whose writes never fail for want of a reader. Everything
    else (isatty, fileno, encoding, ...) is the stream's own. A stream without a file descriptor (a
    test's capture) keeps failing as it did: there is no reader to lose."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            self.lost(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self.lost(e)

    def lost(self, error: OSError) -> None:
        if error.errno not in GONE:  # a full disk under a log file, say: not this class's to hide
            raise error
        # The descriptor itself, not this object: what the stream still buffers, and whatever else writes
        # to it (a library's C code, the DataLoader workers forked from here), go quietly from now on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def outlive_readers() -> None:
    """sys.stdout and sys.stderr from now on outlive their readers. Before W&B is imported: it wraps the
    write method of whatever sys.stdout and sys.stderr are then, to copy the output to the run's logs."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, Outliving):
            setattr(sys, name, Outliving(stream))
