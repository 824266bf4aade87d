"""Resume state (checkpoints/last.pt): weights, optimizer, RNG states, epoch, history.

Written atomically after each epoch, read with `torch.load(weights_only=True)`, so a checkpoint
can never execute code, and a crash while writing leaves the previous one intact.
"""

from __future__ import annotations

import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from kd_cli.engine.files import atomic_write
from kd_cli.errors import KdError

LAST = Path("checkpoints") / "last.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten(python_state: tuple) -> list:
    version, internal, gauss = python_state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(run_dir) / LAST, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # torch warns about what it refuses: kd says it in its own one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise KdError(
            f"checkpoint {path} is corrupt or not a kd checkpoint ({reason}); delete it to start over"
        ) from None
