"""Signals and child processes: every way of stopping kd reaches the run and its children.

SIGTERM (a scheduler, `kill`) and SIGHUP (a closed terminal) are turned into KeyboardInterrupt,
like Ctrl-C, so a stopped run records `interrupted`; once one has arrived, later ones are ignored, so
a second signal cannot cut that record short. A child kd process (the teacher that `kd distill`
trains first, the rerun of `kd reproduce`) is sent SIGTERM when its parent is interrupted, and waited
for, so it records its own state instead of training on as an orphan.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import Iterator, Sequence

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
CHILD_GRACE_SECONDS = 120


def _interrupt(signum, frame):
    for sig in STOP_SIGNALS:  # the first stop signal stops the run; the next ones must not stop its record
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


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


def run_child(args: Sequence[str], cwd=None, capture_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run a child process to the end; if this process is interrupted meanwhile, stop the child
    with SIGTERM, wait for it to record its state, then raise KeyboardInterrupt here too."""
    child = subprocess.Popen(list(args), cwd=cwd, stderr=subprocess.PIPE if capture_stderr else None, text=True)
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
