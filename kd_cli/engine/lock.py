"""One writer per directory: an OS lock (`flock`) held for as long as a run writes its directory.

The lock file `.kd.lock` records its owner (host, PID, start time, command), so a refused second
writer can say who holds the directory. The kernel releases the lock when the owner dies, even by
kill -9, so a run whose summary still says `running` but whose lock nobody holds was killed: it is
`stale`, and `resume=` continues it. Readers (`kd report`) test the lock without taking it for more
than an instant; writers retry for a moment so such a test never refuses them. The owner removes the
lock file when it is done: a finished run keeps no such file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kd_cli.errors import KdError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the owner is recorded, not enforced
    fcntl = None  # type: ignore[assignment]

LOCK = ".kd.lock"
RETRY_SECONDS = 2.0  # how long a writer retries while a reader tests the lock


@dataclass
class Owner:
    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"

    @classmethod
    def me(cls) -> Owner:
        return cls(
            os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S"), " ".join(["kd", *sys.argv[1:]])[:500]
        )


class DirectoryLock:
    """The held lock on one directory. `record_owner()` writes this process into the lock file once
    it is sure to write the directory; `release()` gives the lock up and removes the lock file if this
    process made it or recorded itself in it (a refused process leaves a dead owner's record as it was)."""

    def __init__(self, directory: Path, fd: int, created: bool):
        self.directory, self._fd, self._created, self._recorded = directory, fd, created, False
        self.owner = Owner.me()

    def record_owner(self) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(asdict(self.owner)).encode(), 0)
        self._recorded = True

    @classmethod
    def acquire(cls, directory: Path, busy_hint: str) -> DirectoryLock:
        """Take the lock or raise a one-line KdError naming the owner; `busy_hint` says what to do then."""
        directory = Path(directory)
        path = directory / LOCK
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            created = not path.exists()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise KdError(
                    f"cannot write in {directory} ({error.strerror}); choose a directory you can write"
                ) from None
            if _try_lock(fd):
                if _still_linked(fd, path):  # not a file its last owner removed between our open and lock
                    return cls(directory, fd, created)
                os.close(fd)
                continue
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            owner = read_owner(path)
            who = owner.describe() if owner else "owner unknown"
            raise KdError(f"{directory} is being written by another kd process ({who}); {busy_hint}")

    def release(self) -> None:
        if self._fd < 0:
            return
        if self._created or self._recorded:
            (self.directory / LOCK).unlink(missing_ok=True)  # before unlocking: the next owner makes a new file
        os.close(self._fd)  # closing releases the lock
        self._fd = -1


def holder(directory: Path) -> Owner | None:
    """The live process writing `directory`, or None when nobody holds its lock."""
    path = Path(directory) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # another user's lock we cannot test: do not call its run dead
        return Owner(0, "?", "?", "?")
    except OSError:
        return None
    try:
        if fcntl is None:
            return read_owner(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_owner(path) or Owner(0, "?", "?", "?")
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_owner(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
