"""Finding run directories under the paths given to `kd report` and loading what it needs.

A run directory is a folder holding `.hydra/overrides.yaml` or `summary.json`; the search does not
descend into one (born-again runs keep finished generations in `RUN/generation-K/`, which are
parts of that run, not runs of their own).

Every file is read strictly: a missing file is normal where the run may not have written it yet
(no metrics.csv before the first epoch, no reproduce.json in a run not made by `kd reproduce`), but a
file that is there and cannot be read (permissions) or used (not valid YAML/JSON/CSV, the wrong
shape) is a `BrokenFile`. `kd report` leaves such a run out with one warning line rather than show it
under a wrong setting (e.g. a broken overrides.yaml read as "no overrides") or stop on it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_cli.engine.rundir import REPRODUCTION
from kd_cli.errors import KdError, warn
from kd_cli.overrides import canonical, flatten, split_override

OVERRIDES = Path(".hydra") / "overrides.yaml"
HYDRA = Path(".hydra") / "hydra.yaml"
SUMMARY = "summary.json"
CONFIG = "config_resolved.yaml"
METRICS = "metrics.csv"
# REPRODUCTION (reproduce.json) is written by `kd reproduce` into the run it makes: such a run repeats another
# one (same seed), so counting it as one more sample of a setting would be wrong.

RUNNING, STALE, UNKNOWN = "running", "stale", "unknown"
UNREADABLE, BROKEN = "unreadable", "broken"  # runs left out of the report (see Skipped)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Run:
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # key -> value as typed on the command line
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (hydra's runtime.choices)
    config: dict[str, Any] = field(default_factory=dict)  # config_resolved.yaml, flattened to dotted keys
    summary: dict[str, Any] = field(default_factory=dict)
    reproduction_of: str | None = None
    metrics: list[dict[str, float | str]] = field(default_factory=list)  # metrics.csv rows
    state: str | None = None  # the true status (see run_status); None: summary.json's as it stands

    @property
    def status(self) -> str:
        return self.state or str(self.summary.get("status", UNKNOWN))

    @property
    def stage(self) -> str | None:
        return self.config.get("stage") or self.summary.get("stage")

    def value(self, key: str) -> str | None:
        """The effective value of `key`: the override, else the group choice, else the config value."""
        for source in (self.overrides, self.choices, self.config):
            if key in source:
                return canonical(source[key])
        if key == "status":  # the true one: `stale` for a killed run whose summary still says running
            return self.status
        if key in self.summary:
            return canonical(self.summary[key])
        return None


@dataclass
class Skipped:
    """A run directory left out of the report: one of its files is unreadable or broken."""

    path: Path
    error: BrokenFile

    @property
    def status(self) -> str:
        return UNREADABLE if self.error.unreadable else BROKEN


class BrokenFile(KdError):
    """A file of a run that is there but cannot be read or used. `str()`: `<name> <problem>`, e.g.
    `.hydra/overrides.yaml is not valid YAML (line 2, column 6: did not find expected ',' or ']')`."""

    def __init__(self, path: Path, name: str, problem: str, unreadable: bool = False):
        super().__init__(f"{name} {problem}")
        self.path, self.name, self.problem, self.unreadable = Path(path), name, problem, unreadable


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a run; OSError when that cannot be told (a folder without search permission)."""
    denied: OSError | None = None
    for name in (OVERRIDES, SUMMARY):
        try:
            if stat.S_ISREG(os.stat(path / name).st_mode):
                return True
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as error:
            denied = error
    if denied is not None:
        raise denied
    return False


def find_run_dirs(given: str) -> list[Path]:
    """Every run directory under `given` (resolved, each once, in path order); a one-line error for a
    path that is not a folder, a warning for each folder that cannot be searched."""
    root = Path(given).expanduser()
    if not root.exists():
        raise KdError(f"{given}: no such file or directory")
    if not root.is_dir():
        raise KdError(f"{given} is not a directory; give run directories, sweep folders or an outputs folder")
    return list(dict.fromkeys(run_dir.resolve() for run_dir in _walk(root)))


def no_runs_error(paths: list[str]) -> KdError:
    return KdError(f"no kd runs under {', '.join(paths)} (a run directory holds .hydra/overrides.yaml or summary.json)")


def all_skipped_error(paths: list[str], count: int) -> KdError:
    return KdError(
        f"no readable kd run under {', '.join(paths)}: each of the {count} run directories has an "
        f"unreadable or broken file (named in the warnings above); fix or move those files"
    )


def load_or_skip(path: Path) -> Run | Skipped:
    """The run, or (with one warning line naming the file and the problem) why it is left out."""
    try:
        return load_run(path)
    except BrokenFile as error:
        warn(f"left out {display_path(path)}: its {error}")
        return Skipped(path, error)


def _walk(directory: Path) -> Iterator[Path]:
    try:
        if is_run_dir(directory):
            yield directory
            return
        children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as error:  # a folder that cannot be searched may hide runs: say so, go on
        warn(f"cannot search {display_path(directory)} ({_reason(error)}): any runs in it are left out")
        return
    for child in children:
        yield from _walk(child)


# summary.json values a run can hold: accuracies are percentages, counts whole numbers (None: not measured)
PERCENT_KEYS = (
    *("best_top1", "last_top1", "best_val_top1", "teacher_top1", "top1", "top5", "teacher_agreement"),
    *("best_miou", "last_miou", "best_val_miou", "teacher_miou", "miou", "pixel_acc", "mean_class_acc"),
    *("best_map", "last_map", "best_val_map", "teacher_map", "map", "map50", "map75", "last_map50"),
)
COUNT_KEYS = ("params", "teacher_params", "epochs", "best_epoch")


def impossible_value(summary: dict) -> str | None:
    """What makes a summary.json impossible (an accuracy outside 0-100, a count that is not a whole number):
    such a run was edited or damaged, and averaging it would give a table of nonsense."""
    for key in PERCENT_KEYS:
        value = summary.get(key)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100
        ):
            return f"has {key}={value!r}, not a percentage"
    for key in COUNT_KEYS:
        value = summary.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"has {key}={value!r}, not a count"
    return None


def load_run(path: Path) -> Run:
    """A run's files, read strictly: BrokenFile when one is there but unreadable or unusable."""
    path = Path(path)
    overrides = read_yaml(path, OVERRIDES, list)
    if overrides is not None and not all(isinstance(o, str) for o in overrides):
        raise BrokenFile(path / OVERRIDES, str(OVERRIDES), "holds something other than a list of overrides")
    summary = read_json(path, SUMMARY)
    if summary is not None and not isinstance(summary.get("status", ""), str):
        raise BrokenFile(path / SUMMARY, SUMMARY, "has a status that is not a word")
    if summary is not None and (problem := impossible_value(summary)):
        raise BrokenFile(path / SUMMARY, SUMMARY, problem)
    reproduction = read_json(path, REPRODUCTION)
    if reproduction is not None and not isinstance(reproduction.get("reproduces"), str):
        raise BrokenFile(path / REPRODUCTION, REPRODUCTION, "does not name the run it reproduces")
    run = Run(
        path=path,
        overrides=dict(split_override(o) for o in overrides or []),
        choices=hydra_choices(path),
        config=flatten(read_yaml(path, CONFIG, dict) or {}),
        summary=summary or {},
        reproduction_of=reproduction["reproduces"] if reproduction is not None else None,
        metrics=read_metrics(path),
    )
    run.state = run_status(path, summary)
    return run


def run_status(path: Path, summary: dict[str, Any] | None) -> str:
    """The true status (engine/rundir.run_status): `stale` for a killed run that still says `running`."""
    from kd_cli.engine.rundir import run_status as true_status

    return true_status(path, summary or {})


def hydra_choices(path: Path) -> dict[str, Any]:
    """`.hydra/hydra.yaml`'s hydra.runtime.choices (config group -> option); {} without the file."""
    hydra = read_yaml(path, HYDRA, dict)
    if hydra is None:
        return {}
    node = hydra.get("hydra")
    runtime = node.get("runtime") if isinstance(node, dict) else None
    choices = runtime.get("choices") if isinstance(runtime, dict) else None
    if not isinstance(choices, dict):
        raise BrokenFile(
            path / HYDRA, str(HYDRA), "is not Hydra's record of the run (no hydra.runtime.choices mapping)"
        )
    return choices


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def read_metrics(path: Path) -> list[dict[str, float | str]]:
    """metrics.csv as rows; numbers parsed, empty cells (a column a later epoch added) left out.
    [] when there is none yet; BrokenFile when it is not kd's CSV."""
    text = read_text(path, METRICS)
    if text is None:
        return []
    file = Path(path) / METRICS
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as error:
        raise BrokenFile(file, METRICS, f"is not valid CSV ({error})") from None
    if rows and "epoch" not in (reader.fieldnames or []):
        raise BrokenFile(file, METRICS, "has no epoch column")
    parsed = []
    for number, row in enumerate(rows, start=2):
        if None in row:
            raise BrokenFile(file, METRICS, f"line {number} has more cells than the header")
        values = {key: _number_or_text(value) for key, value in row.items() if value not in ("", None)}
        if not isinstance(values.get("epoch"), float):
            raise BrokenFile(file, METRICS, f"line {number} has no epoch number")
        parsed.append(values)
    return parsed


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_text(run_dir: Path, name: str | Path) -> str | None:
    """A run's file as text; None when it is not there; BrokenFile when it cannot be read."""
    path = Path(run_dir) / name
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise BrokenFile(
            path, str(name), f"cannot be read ({_reason(error)})", unreadable=isinstance(error, PermissionError)
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BrokenFile(
            path, str(name), f"is not text (byte {data[error.start]:#04x} at offset {error.start}): binary or corrupt"
        ) from None


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def read_yaml(run_dir: Path, name: str | Path, kind: type) -> Any:
    """A YAML file holding a `kind` (dict or list); None when it is not there; BrokenFile otherwise."""
    return _parse(run_dir, name, kind, _load_yaml, "YAML")


def read_json(run_dir: Path, name: str | Path) -> dict[str, Any] | None:
    """A JSON object; None when the file is not there; BrokenFile when it is unreadable or not an object."""
    return _parse(run_dir, name, dict, strict_json, "JSON")


def strict_json(text: str) -> Any:
    """JSON as kd writes it: a bare NaN or Infinity (which Python's json accepts) means a damaged file."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON (kd writes null for a missing number)")

    return json.loads(text, parse_constant=refuse)


def _parse(run_dir: Path, name: str | Path, kind: type, parse: Callable[[str], Any], language: str) -> Any:
    text = read_text(run_dir, name)
    if text is None:
        return None
    path = Path(run_dir) / name
    if not text.strip():
        raise BrokenFile(path, str(name), "is empty")
    try:
        data = parse(text)
    except (ValueError, yaml.YAMLError) as error:
        raise BrokenFile(path, str(name), f"is not valid {language} ({_parse_error(error)})") from None
    if not isinstance(data, kind):
        names: dict[type, str] = {dict: "a mapping" if language == "YAML" else "an object", list: "a list"}
        wanted = names[kind]
        raise BrokenFile(path, str(name), f"holds {_kind_name(data)}, not {wanted}")
    return data


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _parse_error(error: Exception) -> str:
    """One line: where and what (`line 2, column 6: did not find expected ','`)."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    if isinstance(error, ValueError) and not isinstance(error, yaml.YAMLError):
        return str(error)
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow (binary data)
        return f"offset {error.position}: {error.reason}"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(error).split())


def _kind_name(data: Any) -> str:
    if isinstance(data, dict):
        return "a mapping"
    if isinstance(data, list):
        return "a list"
    if data is None:
        return "null"
    return f"a single {type(data).__name__}"


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower()


def display_path(path: Path) -> str:
    """Relative to the working directory when under it (shorter in tables and messages)."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if relative.startswith("..") else relative
