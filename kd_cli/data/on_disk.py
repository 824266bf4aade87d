"""Turning "files absent", "download failed" and "files corrupt" into one-line, fixable errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from kd_cli.errors import KdError, warn

T = TypeVar("T")


def open_or_explain(
    title: str, folder: str, expected: str, files: Sequence[str], download: bool, open_: Callable[[], T]
) -> T:
    """Run `open_()` (torchvision's own loading and download code), explaining any failure in one line.

    `folder` is the absolute folder the files belong in, `expected` how the user should recognise them
    (e.g. "cifar-100-python/"), `files` their absolute paths.
    """
    missing = [path for path in files if not os.path.isfile(path)]
    if missing and not download:
        raise KdError(
            f"{title} not found under {folder} (expected {expected}); put the files there "
            f"or run with dataset.download=true (needs internet)"
        )
    try:
        return open_()
    except KdError:
        raise
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, pickle/parse errors...
        if missing:
            raise KdError(
                f"{title}: downloading into {folder} failed ({brief(error)}); check the internet connection, "
                f"or put the files there by hand (expected {expected})"
            ) from error
        raise KdError(
            f"{title} files under {folder} look corrupt ({brief(error)}); delete them and download again "
            f"(dataset.download=true) or replace them (expected {expected})"
        ) from error


def brief(error: BaseException, limit: int = 160) -> str:
    """An exception on one short line: enough to tell "no network" from "checksum wrong"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torchvision's multi-mirror errors put the cause on the last line, the context on the first.
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def walk_without_loops(top: str) -> list[tuple[str, list[str]]]:
    """(folder, file names) under `top` in torchvision's order, following symlinks but not a folder
    symlink that leads back to a folder it is inside (each such loop named in a warning). Hidden entries
    (a name starting with "."): `.ipynb_checkpoints/`, `.DS_Store`, macOS's `._photo.png` are left out."""
    if not os.path.isdir(top):
        return []
    # The folders each folder is inside, by (device, inode): from the file system's root, so a link up
    # to the data set's root (or above it) is a loop too.
    real = Path(os.path.realpath(top))
    parents = {top: {_identity(str(folder)) for folder in (real, *real.parents)}}
    found = []
    for folder, subfolders, files in os.walk(top, followlinks=True):
        inside = parents.pop(folder)
        kept = []
        for name in (name for name in subfolders if not name.startswith(".")):
            path = os.path.join(folder, name)
            try:
                identity = _identity(path)
            except OSError:  # gone since os.walk listed it, or not ours to enter: as os.walk does, skip it
                continue
            if identity in inside:
                warn(
                    f"{shown_path(path)} is a symlink to {shown_path(os.path.realpath(path))}, a folder it is "
                    "inside: a loop, not followed (its images are read once, where they are)"
                )
                continue
            parents[path] = inside | {identity}
            kept.append(name)
        subfolders[:] = kept
        found.append((folder, [name for name in files if not name.startswith(".")]))
    return sorted(found)


def _identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def shown_path(path: str | os.PathLike) -> str:
    """A path as it can be printed: a name that is not UTF-8 (an old archive's Latin-1 `café.png`) keeps
    its odd bytes as \\xNN escapes instead of failing to encode."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
