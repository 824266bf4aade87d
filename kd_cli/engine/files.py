"""File writes for run directories: atomic, with the user's umask, and strict JSON.

A file is either its old content or its complete new content, never half: it is written to a
temporary file beside it, then renamed over it. The temporary file gets the permissions any new
file of the user's would get (`tempfile.mkstemp` makes it 0600, which would hide every run from a
teammate in the same group).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`. Whatever `write`
    returns (`Path.write_text` returns a count) is ignored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, new_file_mode())  # after writing: some writers replace the file they are given
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwritable(path: Path) -> str | None:
    """Why a file could not be written at `path` (None: it can), found before any work is done: it is
    a folder, a file stands where its folder should be, or its folder (or the nearest one that exists)
    takes no new files (permissions, a read-only file system; tried with a temporary file)."""
    path = Path(path)
    if path.is_dir():
        return "it is a folder"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"{folder} takes no new files: {error.strerror or error}"
    return None


def new_file_mode() -> int:
    """0666 less the process's umask: what `open(path, "w")` would give a new file."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: NaN and infinities (which json.dumps would write as bare NaN) become null."""
    text = json.dumps(finite(data), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def finite(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, in nested dicts and lists too."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def leftover_temporary_files(directory: Path) -> list[Path]:
    """Temporary files of `atomic_write` that a killed process left behind in `directory` (not below it)."""
    return [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
