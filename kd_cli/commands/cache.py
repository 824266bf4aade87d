"""`kd cache ls|clear [dir=DIR] [key=PREFIX]`: the teacher cache that `kd distill` fills and reads.

Each entry is one data stream's teacher logits (see kd_cli/engine/teacher_cache.py): the teacher, the
data set, the stream's seed and batch size, how many epochs are stored, the size on disk and when a
run last used it. `clear` removes every entry, or those whose key starts with PREFIX; runs that need
them compute their teacher's outputs again (and store them again).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from kd_cli.errors import KdError

DEFAULT_DIR = Path("outputs/.cache/teacher")  # distill's default: ${paths.outputs}/.cache/teacher
USAGE = (
    "kd cache ls|clear [dir=DIR] [key=PREFIX]   "
    "(DIR: the distill config's teacher_cache.dir, default outputs/.cache/teacher)"
)
KEYS = ("dir", "key")


def main(argv: list[str]) -> int:
    if not argv or any(word in ("-h", "--help", "help") for word in argv):
        print(f"usage: {USAGE}\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}")
        return 0
    action, options = argv[0], parse_options(argv[1:])
    if action not in ("ls", "clear"):
        raise KdError(f"kd cache: unknown action '{action}' (choose from: ls, clear); usage: {USAGE}")
    root = cache_folder(options.get("dir", str(DEFAULT_DIR)))
    chosen = chosen_entries(root, options.get("key", ""))
    return list_entries(root, chosen) if action == "ls" else clear_entries(root, chosen)


def cache_folder(text: str) -> Path:
    if not text.strip():
        raise KdError(
            f"kd cache: dir= is empty; give the cache folder (the distill config's teacher_cache.dir, "
            f"default {DEFAULT_DIR})"
        )
    root = Path(text).expanduser()
    if root.exists() and not root.is_dir():
        raise KdError(f"kd cache: {root} is a file, not a cache folder; give the distill config's teacher_cache.dir")
    return root


def chosen_entries(root: Path, prefix: str) -> list:
    """The entries whose key starts with `prefix` (all when it is empty), least recently used first."""
    from kd_cli.engine.teacher_cache import entries

    found = entries(root)
    chosen = [entry for entry in found if entry.path.name.startswith(prefix)]
    if prefix and not chosen:
        raise KdError(f"kd cache: no entry of {root} has a key starting with '{prefix}' (see kd cache ls dir={root})")
    return chosen


def parse_options(words: list[str]) -> dict[str, str]:
    options = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in KEYS:
            raise KdError(
                f"kd cache: unknown option '{word}' (known: {', '.join(f'{k}=' for k in KEYS)}); usage: {USAGE}"
            )
        options[key] = value
    return options


def list_entries(root: Path, found: list) -> int:
    if not found:
        print(f"teacher cache {root}: empty" if root.is_dir() else f"teacher cache {root}: no such folder yet")
        return 0
    header = (
        f"{'key':<24}  {'teacher':<14} {'data set':<12} {'aug seed':>8} {'batch':>5} {'epochs':>6} {'size':>9}"
        "  last used"
    )
    print(f"teacher cache {root}")
    print(header)
    for entry in reversed(found):  # most recently used first
        d = entry.description
        stream = d.get("stream", {})
        print(
            f"{entry.path.name:<24}  {str(d.get('teacher_arch', '?')):<14} {str(d.get('dataset', '?')):<12} "
            f"{str(stream.get('seed', '?')):>8} {str(stream.get('batch_size', '?')):>5} {entry.epochs:>6} "
            f"{human_size(entry.bytes):>9}  {age(time.time() - entry.last_used)}"
        )
    print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}, {human_size(sum(e.bytes for e in found))}")
    return 0


def clear_entries(root: Path, chosen: list) -> int:
    for entry in chosen:
        shutil.rmtree(entry.path, ignore_errors=True)
    freed = human_size(sum(e.bytes for e in chosen))
    print(f"removed {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} of {root} ({freed})")
    return 0


def human_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"
