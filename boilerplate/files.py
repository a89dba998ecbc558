"""Files written whole or not at all, so a run killed while saving never leaves half a file; and JSON
that strict readers accept."""

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

PARTIAL = ".partial"  # the end of the name of a file atomic_write has not finished


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`. A kill in between
    leaves the temporary file: remove_partial_writes() clears them. The file's permissions are those
    open() would give: a new one's from the umask, a rewritten one's its own."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL)
    try:
        # mkstemp's file is the owner's alone (0600): a lab's shared outputs folder would hide every
        # model and results.json from the rest of the team, and a rewritten README from its readers.
        # Where permissions cannot be set (a FAT or some network mounts), the file is written as it is.
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def umask() -> int:
    """This process's umask, read without setting it: os.umask sets it, for every thread, however briefly."""
    try:
        with open("/proc/self/status") as status:  # Linux 4.7 on
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk; the user's quota spent (a cluster's home folder)


def room(folder: str | Path) -> None:
    """Writes one block in `folder` and syncs it: OSError (ENOSPC, EDQUOT) where there is no room. Making
    an empty file takes none (an inode only), and a network file system may say so only as it syncs."""
    with tempfile.TemporaryFile(dir=folder) as probe:
        probe.write(bytes(4096))
        probe.flush()
        os.fsync(probe.fileno())


def no_room(folder: str | Path) -> str | None:
    """Why `folder` has no room left (the OS's words), if it has none; None otherwise, or if it is gone."""
    try:
        room(folder)
    except OSError as e:
        return e.strerror if e.errno in NO_ROOM else None
    return None


def remove_partial_writes(folder: Path, name: str = "*") -> None:
    """What atomic_write left in `folder` (of the file `name`, or any) when its process was killed
    mid-write. Call it only while no other process can be writing them (the folder or file is owned)."""
    for leftover in folder.glob(f".{name}.*{PARTIAL}"):
        leftover.unlink(missing_ok=True)


def write_failure(path: Path, save: Callable[[], None]) -> str | None:
    """Call save(), which writes `path`: None when it could, else why not (a full disk, a quota, a
    read-only folder), for a run to end with that reason rather than a traceback."""
    try:
        save()
        return None
    except Exception as e:
        cause = e  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        return f"could not write {path} ({cause.strerror or cause})"


def json_safe(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity: write them as the strings "NaN", "Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(json_safe(obj), indent=2, allow_nan=False).encode() + b"\n"
    atomic_write(path, lambda f: f.write(data))
