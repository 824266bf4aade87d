"""Run the real `kd` command in a subprocess, as a user would, and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FAST = ["trainer.progress=plain", "trainer.num_workers=0"]
# A few steps of training, and CIFAR-shaped random data: what most CLI tests of methods run on.
SHORT = ["trainer.epochs=1", "trainer.max_steps_per_epoch=3", *FAST]
SYNTHETIC = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32", "trainer.batch_size=16"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def kd(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> Result:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("KD_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "kd_cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def kd_ok(*args: str, cwd: Path, **kwargs) -> Result:
    result = kd(*args, cwd=cwd, **kwargs)
    assert result.code == 0, (
        f"kd {' '.join(args)} failed ({result.code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr starting `kd: error:`, no traceback."""
    assert result.code != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    assert line.startswith("kd: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def run_dirs(outputs: Path, stage: str) -> list[Path]:
    return sorted(p.parent for p in (Path(outputs) / stage).glob("*/*/summary.json"))


def kd_here(*args: str, cwd: Path) -> Result:
    """`kd ARGS` in this process (what a subprocess would print and return, without paying for a new
    interpreter and its imports, seconds a command): for checks of bad input that stop before any work
    and for runs whose subject is what they write, not the process (signals, exit of a child). The
    process-wide state a run sets (signal handlers, logging, environment, torch's random and
    deterministic settings, threads) is put back afterwards."""
    import contextlib
    import io
    import logging
    import signal

    from hydra.core.global_hydra import GlobalHydra

    from kd_cli import errors
    from kd_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = (
        sys.argv[:],
        os.getcwd(),
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
        logging.getLogger().handlers[:],
        dict(os.environ),
        torch_state(),
    )
    code = 0
    try:
        os.chdir(cwd)
        os.environ.pop("KD_DEBUG", None)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv[:], cwd_before, handlers, root_handlers, environment, torch_before = saved
        restore_torch_state(torch_before)
        os.chdir(cwd_before)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        logging.getLogger().handlers[:] = root_handlers
        os.environ.clear()
        os.environ.update(environment)
        GlobalHydra.instance().clear()
        errors.WARNINGS.clear()
        errors.INTERRUPTED_RUNS.clear()
        errors.INTERRUPTION_NOTES.clear()
    return Result(code, out.getvalue(), err.getvalue())


def kd_here_each(jobs: dict[str, list[str]], cwd: Path) -> dict[str, Result]:
    """{name: Result} of each job's `kd ARGS`, run one after another in this process: several runs for
    the price of no start-up (running them as processes side by side cost more on two cores)."""
    return {name: kd_here(*args, cwd=cwd) for name, args in jobs.items()}


def torch_state() -> tuple:
    import random

    import numpy as np
    import torch

    return (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )


def restore_torch_state(state: tuple) -> None:
    import random

    import numpy as np
    import torch

    rng, np_rng, py_rng, deterministic, warn_only, threads = state
    torch.set_rng_state(rng)
    np.random.set_state(np_rng)
    random.setstate(py_rng)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)


def kd_here_ok(*args: str, cwd: Path) -> Result:
    result = kd_here(*args, cwd=cwd)
    assert result.code == 0, (
        f"kd {' '.join(args)} failed ({result.code}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def start_kd(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KD_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "kd_cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"kd ended early ({process.returncode}): {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
