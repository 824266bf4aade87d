"""Settings, their aggregates over seeds, and the table written to the terminal, CSV and Markdown.

A setting is the set of runs whose overrides agree on every key but `seed` (and hydra.*, paths.*,
`resume`, which say where a run lives, not what it computes), plus the stage, so a teacher run and
a distill run never share a row. A key's value is the effective one (the override, else the group
choice or the saved config value), so `method.temperature=4` and the default 4.0 are one setting.
Only complete runs are averaged; the others are counted in the status column and listed below.
A run's status is the true one (`stale` for a killed run whose summary.json still says `running`).
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_cli.commands.report.discover import STALE, Run, as_number, display_path
from kd_cli.console import print_table
from kd_cli.errors import KdError, unknown_choice

EXCLUDED_KEYS = {"seed", "resume"}
EXCLUDED_PREFIXES = ("hydra.", "paths.")
STAGE = "stage"
COMPLETE = "complete"
# Each task's headline metric (top1, miou, map) names the score columns: best_top1, last_miou, teacher_top1, ...
# (one report holds runs of one task). Evaluate runs have one score (`top1`, `miou`): it stands for both
# best and last.
METRICS = ("best_top1", "last_top1", "best_miou", "last_miou", "best_map", "last_map")
LABELS = {"top1": "top-1", "miou": "mIoU", "map": "mAP"}
HEADERS = {"n": "n", "params": "params", "wall_time_s": "wall time", "status": "status"}


def header(column: str) -> str:
    """A column's title: `best_miou` -> "best mIoU %", a setting key as it is."""
    role, _, metric = column.partition("_")
    if metric in LABELS and role in ("best", "last", "teacher"):
        return f"{role} {LABELS[metric]} %"
    return HEADERS.get(column, column)


def score_columns(metric: str) -> tuple[str, str]:
    return f"best_{metric}", f"last_{metric}"


def fallback(column: str) -> str | None:
    role, _, metric = column.partition("_")
    return metric if role in ("best", "last") and metric in LABELS else None


MISSING = "—"


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (0 for a single run, so error bars still draw)."""
        if not self.values:
            return None
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def text(self) -> str:
        if not self.values:
            return MISSING
        return f"{self.mean:.2f}" if self.n == 1 else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class Row:
    values: dict[str, str | None]  # setting key -> effective value
    runs: list[Run] = field(default_factory=list)

    @property
    def complete(self) -> list[Run]:
        return [run for run in self.runs if run.status == COMPLETE]

    def stat(self, metric: str) -> Stat:
        return Stat(_summary_numbers(self.complete, metric, fallback(metric)))

    def mean_of(self, key: str) -> float | None:
        return Stat(_summary_numbers(self.complete, key)).mean

    @property
    def params(self) -> int | None:
        found = _summary_numbers(self.complete, "params")
        return int(found[0]) if found else None

    @property
    def status(self) -> str:
        counts = Counter(run.status for run in self.runs)
        ordered = sorted(counts, key=lambda status: (status != COMPLETE, status))
        return ", ".join(f"{counts[status]} {status}" for status in ordered)


def _summary_numbers(runs: list[Run], key: str, fallback: str | None = None) -> list[float]:
    values = [run.summary.get(key, run.summary.get(fallback) if fallback else None) for run in runs]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


@dataclass
class Report:
    keys: list[str]  # setting keys whose value differs between rows: the table's first columns
    fixed: dict[str, str | None]  # setting keys with one value for every row
    rows: list[Row]
    metric: str = "top1"  # the runs' task's headline metric

    @property
    def columns(self) -> list[str]:
        return [
            *self.keys,
            *score_columns(self.metric),
            "n",
            f"teacher_{self.metric}",
            "params",
            "wall_time_s",
            "status",
        ]

    @property
    def runs(self) -> list[Run]:
        return [run for row in self.rows for run in row.runs]


def build_report(runs: list[Run], sort: str | None = None) -> Report:
    keys = setting_keys(runs)
    rows = group_runs(runs, keys)
    varying = [key for key in keys if len({row.values[key] for row in rows}) > 1]
    fixed = {key: rows[0].values[key] for key in keys if key not in varying}
    report = Report(varying, fixed, rows, runs_metric(runs))
    report.rows = sort_rows(report, sort)
    return report


def _metric_of(summary: dict) -> str | None:
    """A summary's headline metric; None for a run that scores nothing (an export)."""
    if summary.get("metric"):
        return str(summary["metric"])
    return "top1" if any(key in summary for key in ("best_top1", "last_top1", "top1")) else None


def runs_metric(runs: list[Run]) -> str:
    """The headline metric the runs' summaries name (`metric`; top1 before kd had tasks); runs of two
    tasks do not share a table."""
    metrics = sorted({metric for run in runs if (metric := _metric_of(run.summary))})
    if len(metrics) > 1:
        raise KdError(
            f"these runs are scored by {len(metrics)} metrics ({', '.join(metrics)}: different tasks); report "
            "them apart, e.g. with --where dataset.name=NAME or a folder per task"
        )
    return metrics[0] if metrics and metrics[0] in LABELS else "top1"


def setting_keys(runs: list[Run]) -> list[str]:
    """The stage, then every overridden key (in first-seen order) but those that are not settings."""
    keys = {STAGE: None}
    for run in runs:
        for key in run.overrides:
            if key not in EXCLUDED_KEYS and not key.startswith(EXCLUDED_PREFIXES):
                keys.setdefault(key, None)
    return list(keys)


def group_runs(runs: list[Run], keys: list[str]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for run in runs:
        values = {key: run.value(key) for key in keys}
        rows.setdefault(tuple(values.values()), Row(values)).runs.append(run)
    return list(rows.values())


def natural(value: str | None) -> tuple:
    """Numbers in numeric order (2 before 10), before text."""
    number = as_number(value)
    return (0, number, "") if number is not None else (1, 0.0, value or "")


def sort_rows(report: Report, sort: str | None) -> list[Row]:
    if not sort:
        return sorted(report.rows, key=lambda row: [natural(row.values[key]) for key in report.keys])
    column, descending = sort.removeprefix("-"), sort.startswith("-")
    if column not in report.columns:
        raise unknown_choice("column for --sort", column, report.columns)
    value = _sort_value(report, column)
    present = [row for row in report.rows if value(row) is not None]
    absent = [row for row in report.rows if value(row) is None]  # rows without the value go last either way
    return sorted(present, key=value, reverse=descending) + absent


def _sort_value(report: Report, column: str) -> Callable[[Row], Any]:
    if column in report.keys:
        return lambda row: natural(row.values[column])
    if column in METRICS:
        return lambda row: row.stat(column).mean
    return lambda row: _raw_value(row, column)


def _raw_value(row: Row, column: str) -> Any:
    if column == "n":
        return len(row.complete)
    if column == "params":
        return row.params
    if column == "status":
        return row.status
    return row.mean_of(column)


def display_cells(report: Report, row: Row) -> list[str]:
    """One row's cells as shown in the terminal and in Markdown."""
    values = [row.values[key] for key in report.keys]
    cells = [value if value is not None else MISSING for value in values]
    teacher, wall = row.mean_of(f"teacher_{report.metric}"), row.mean_of("wall_time_s")
    best, last = score_columns(report.metric)
    return [
        *cells,
        row.stat(best).text(),
        row.stat(last).text(),
        str(len(row.complete)),
        f"{teacher:.2f}" if teacher is not None else MISSING,
        f"{row.params:,}" if row.params is not None else MISSING,
        format_duration(wall) if wall is not None else MISSING,
        row.status,
    ]


def record(report: Report, row: Row) -> dict[str, Any]:
    """One row for CSV: mean and std in columns of their own, numbers unformatted."""
    fields: dict[str, Any] = {key: row.values[key] for key in report.keys}
    for metric in score_columns(report.metric):
        stat = row.stat(metric)
        fields[metric], fields[f"{metric}_std"] = stat.mean, stat.std
    fields.update(
        n=len(row.complete),
        **{f"teacher_{report.metric}": row.mean_of(f"teacher_{report.metric}")},
        params=row.params,
        wall_time_s=row.mean_of("wall_time_s"),
        status=row.status,
    )
    return fields


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def notes(report: Report) -> list[str]:
    """Lines under the table: what is fixed, how numbers are aggregated, which runs did not complete."""
    lines = [
        f"{_count(len(report.runs), 'run')} in {_count(len(report.rows), 'setting')}; "
        f"{LABELS[report.metric]} is mean ± std "
        f"over seeds of complete runs only (n = how many)"
    ]
    if report.fixed:
        lines.append("same in every row: " + ", ".join(f"{k}={v}" for k, v in report.fixed.items()))
    for run in report.runs:
        if run.status != COMPLETE:
            detail = run.summary.get("error")
            if run.status == STALE:
                where = display_path(run.path)
                detail = (
                    f"killed: its summary says running but no process holds it; continue it with "
                    f"kd {run.stage or 'STAGE'} resume={where}"
                )
            lines.append(f"{run.status}: {display_path(run.path)}" + (f"  ({detail})" if detail else ""))
    return lines


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def print_report(report: Report, extra_notes: list[str]) -> None:
    columns = [(header(c), "left" if c in report.keys or c == "status" else "right") for c in report.columns]
    # Not a terminal (a pipe, a file): wide enough that "mean ± std" cells never wrap.
    print_table(
        "kd report",
        columns,
        [display_cells(report, row) for row in report.rows],
        notes=[*notes(report), *extra_notes],
        width=None if sys.stdout.isatty() else 200,
    )


def write_csv(report: Report, path: Path) -> None:
    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=list(record(report, report.rows[0])))
        writer.writeheader()
        writer.writerows(record(report, row) for row in report.rows)

    _write(path, write)


def write_markdown(report: Report, path: Path) -> None:
    def write(handle) -> None:
        titles = [header(column) for column in report.columns]
        align = ["---" if column in report.keys or column == "status" else "---:" for column in report.columns]
        for cells in [titles, align, *(display_cells(report, row) for row in report.rows)]:
            handle.write("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n")

    _write(path, write)


def _write(path: Path, write: Callable) -> None:
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            write(handle)
    except OSError as error:
        raise KdError(f"cannot write {path}: {error.strerror or error}") from None
