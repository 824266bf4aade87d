"""PNG plots for `kd report --plot DIR`: the metric against each swept numeric parameter (error bars:
std over seeds, one line per value of the other varying keys) and every run's training curves."""

from __future__ import annotations

import re
from pathlib import Path

from kd_cli.commands.report.discover import as_number
from kd_cli.commands.report.table import COMPLETE, LABELS, Report, Row, header


def curves(report: Report) -> dict[str, str]:
    """The metrics.csv columns drawn per run: the test score of the runs' task, and the training loss."""
    return {f"test_{report.metric}": f"test {LABELS[report.metric]} %", "train_loss": "train loss"}


def write_plots(report: Report, metric: str, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    directory.mkdir(parents=True, exist_ok=True)
    written = [plot_metric_against(report, key, metric, directory) for key in numeric_keys(report)]
    written += [plot_curves(report, column, title, directory) for column, title in curves(report).items()]
    return [path for path in written if path is not None]


def numeric_keys(report: Report) -> list[str]:
    """Varying keys with numbers for values (rows without the key, e.g. a teacher run's temperature,
    left aside) and at least two of them: the ones a line plot has an x axis for."""
    keys = []
    for key in report.keys:
        values = {row.values[key] for row in report.rows if row.values[key] is not None}
        if len(values) > 1 and all(as_number(value) is not None for value in values):
            keys.append(key)
    return keys


def line_label(report: Report, row: Row, x_key: str) -> str:
    others = [f"{key}={row.values[key]}" for key in report.keys if key != x_key]
    return ", ".join(others)


def plot_metric_against(report: Report, x_key: str, metric: str, directory: Path) -> Path | None:
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in report.rows:
        stat, x = row.stat(metric), row.values[x_key]
        if stat.mean is not None and stat.std is not None and x is not None:  # (None when stat.n == 0)
            lines.setdefault(line_label(report, row, x_key), []).append((float(x), stat.mean, stat.std))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, points in sorted(lines.items()):
        xs, means, stds = zip(*sorted(points))
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=label or None)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{header(metric)} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if any(label for label in lines):
        ax.legend(fontsize=8)
    path = directory / f"{metric}_vs_{_file_name(x_key)}.png"
    _save(fig, path)
    return path


def plot_curves(report: Report, column: str, title: str, directory: Path) -> Path | None:
    """One line per run, one colour per setting; unfinished runs dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for index, row in enumerate(report.rows):
        label = ", ".join(f"{key}={row.values[key]}" for key in report.keys) or None
        for run in row.runs:
            points = [
                (r["epoch"], r[column])
                for r in run.metrics  # read (and checked) with the run
                if isinstance(r.get("epoch"), float) and isinstance(r.get(column), float)
            ]
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(
                xs,
                ys,
                color=f"C{index % 10}",
                linestyle="-" if run.status == COMPLETE else "--",
                marker="." if len(xs) < 30 else None,
                label=label,
            )
            label, drawn = None, True  # one legend entry per setting
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    if report.keys:
        ax.legend(fontsize=8)
    path = directory / f"curves_{column}.png"
    _save(fig, path)
    return path


def _file_name(key: str) -> str:
    return re.sub(r"[^\w.-]+", "_", key)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
