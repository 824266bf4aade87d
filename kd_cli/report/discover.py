"""Finding run directories under the paths given to `kd report` and loading what it needs.

A run directory is a folder holding `.hydra/overrides.yaml` or `summary.json`; the search does not
descend into one (born-again runs keep finished generations in `RUN/generation-K/`, which are
parts of that run, not runs of their own).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from kd_cli.errors import KdError

OVERRIDES = Path(".hydra") / "overrides.yaml"
HYDRA = Path(".hydra") / "hydra.yaml"
SUMMARY = "summary.json"
CONFIG = "config_resolved.yaml"
METRICS = "metrics.csv"
# Written by `kd reproduce` into the run it makes: such a run repeats another one (same seed), so
# counting it as one more sample of a setting would be wrong.
REPRODUCTION = "reproduce.json"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Run:
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # key -> value as typed on the command line
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (hydra's runtime.choices)
    config: dict[str, Any] = field(default_factory=dict)  # config_resolved.yaml, flattened to dotted keys
    summary: dict[str, Any] = field(default_factory=dict)
    reproduction_of: str | None = None

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    @property
    def stage(self) -> str | None:
        return self.config.get("stage") or self.summary.get("stage")

    def value(self, key: str) -> str | None:
        """The effective value of `key`: the override, else the group choice, else the config value."""
        for source in (self.overrides, self.choices, self.config, self.summary):
            if key in source:
                return canonical(source[key])
        return None


def is_run_dir(path: Path) -> bool:
    return (path / OVERRIDES).is_file() or (path / SUMMARY).is_file()


def find_runs(paths: list[str]) -> list[Run]:
    """Every run directory under `paths`, each once, in path order."""
    seen: dict[Path, None] = {}
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise KdError(f"{given}: no such file or directory")
        if not root.is_dir():
            raise KdError(f"{given} is not a directory; give run directories, sweep folders or an outputs folder")
        for run_dir in _walk(root):
            seen.setdefault(run_dir.resolve(), None)
    if not seen:
        raise KdError(f"no kd runs under {', '.join(paths)} (a run directory holds .hydra/overrides.yaml or "
                      f"summary.json)")
    return [load_run(path) for path in seen]


def _walk(directory: Path) -> Iterator[Path]:
    if is_run_dir(directory):
        yield directory
        return
    try:
        children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # unreadable folders are skipped, like `find` does
        return
    for child in children:
        yield from _walk(child)


def load_run(path: Path) -> Run:
    reproduction = read_json_dict(path / REPRODUCTION)
    return Run(
        path=path,
        overrides=dict(split_override(o) for o in _read_yaml(path / OVERRIDES) or []),
        choices=(((_read_yaml(path / HYDRA) or {}).get("hydra") or {}).get("runtime") or {}).get("choices") or {},
        config=flatten(_read_yaml(path / CONFIG) or {}),
        summary=read_json_dict(path / SUMMARY),
        reproduction_of=reproduction.get("reproduces") if reproduction else None,
    )


def split_override(override: str) -> tuple[str, str]:
    """`++student.kwargs.width=8` -> ("student.kwargs.width", "8"); `~key` -> ("key", "~deleted")."""
    text = str(override)
    key, sep, value = text.lstrip("+~").partition("=")
    return key, value if sep else "~deleted"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole (a list is one value of one option)."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def canonical(value: Any) -> str:
    """One spelling per value, so `4` (override) and `4.0` (saved config) are the same setting."""
    if isinstance(value, str):
        value = _parse_scalar(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isfinite(number) and number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        return repr(number)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _parse_scalar(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("null", "~"):  # Hydra's and YAML's null; `none` is a real value in kd (method=none)
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return float(text)
    except ValueError:
        return text


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def read_metrics(path: Path) -> list[dict[str, float | str]]:
    """metrics.csv as rows; numbers parsed, empty cells (a column a later epoch added) left out."""
    try:
        with open(Path(path) / METRICS, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return []
    return [{key: _number_or_text(value) for key, value in row.items() if value not in ("", None)} for row in rows]


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return None


def read_json_dict(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def display_path(path: Path) -> str:
    """Relative to the working directory when under it (shorter in tables and messages)."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if relative.startswith("..") else relative
