"""Signals and child processes: every way of stopping kd reaches the run and its children.

SIGTERM (a scheduler, `kill`) and SIGHUP (a closed terminal) are turned into KeyboardInterrupt,
like Ctrl-C, so a stopped run records `interrupted`; once one has arrived, later ones are ignored, so
a second signal cannot cut that record short. A child kd process (the teacher that `kd distill`
trains first, the rerun of `kd reproduce`) is sent SIGTERM when its parent is interrupted, and waited
for, so it records its own state instead of training on as an orphan; and if its parent dies without
a word (kill -9), the child notices within a second and stops itself the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
CHILD_GRACE_SECONDS = 120
PARENT = "KD_PARENT_PID"  # set by run_child: the kd process that started this one


def _interrupt(signum, frame):
    ignore_stop_signals()  # the first stop signal stops the run; the next ones must not stop its record
    raise KeyboardInterrupt


def ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def install_interrupt_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP all raise KeyboardInterrupt, once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """No stop signal interrupts the block (recording a run's final state, waiting for a child)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch_parent() -> None:
    """In a child of run_child: stop (as SIGTERM does) when the parent is gone, e.g. killed by kill -9."""
    parent = int(os.environ.pop(PARENT, "0") or 0)  # (popped: not for this process's own children)
    if not parent:
        return
    _term_when_parent_dies()

    def watch() -> None:  # elsewhere than Linux, and should the parent be gone before the line above
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kd-watch-parent", daemon=True).start()


def _term_when_parent_dies() -> None:
    """On Linux the kernel sends SIGTERM the moment the parent dies (prctl PR_SET_PDEATHSIG): a short
    teacher run must not finish its training as an orphan between two polls."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # the poll in watch_parent still stops this process


def run_child(args: Sequence[str], cwd=None, capture_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run a child process to the end; if this process is interrupted meanwhile, stop the child
    with SIGTERM, wait for it to record its state, then raise KeyboardInterrupt here too."""
    env = {**os.environ, PARENT: str(os.getpid())}
    child = subprocess.Popen(
        list(args), cwd=cwd, env=env, stderr=subprocess.PIPE if capture_stderr else None, text=True
    )
    try:
        _, stderr = child.communicate()
    except KeyboardInterrupt:
        with signals_held():
            _stop(child)
        raise
    return subprocess.CompletedProcess(list(args), child.returncode, None, stderr)


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)  # (ignored if a Ctrl-C in the terminal reached it already)
    try:
        child.communicate(timeout=CHILD_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
