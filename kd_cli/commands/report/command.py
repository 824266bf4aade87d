"""`kd report PATH... [--where KEY=VALUE] [--sort COLUMN] [--csv FILE] [--markdown FILE] [--plot DIR]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from kd_cli.commands.report.discover import (
    Run,
    Skipped,
    all_skipped_error,
    display_path,
    find_run_dirs,
    load_or_skip,
    no_runs_error,
)
from kd_cli.commands.report.table import (
    METRICS,
    build_report,
    print_report,
    write_csv,
    write_markdown,
)
from kd_cli.errors import KdError
from kd_cli.overrides import canonical

DESCRIPTION = """\
One row per setting: runs that differ only in `seed` are one setting, shown as mean ± std over
seeds of the complete runs (n = how many). Failed, interrupted, running and stale (killed: its summary
says running but no process holds the run) runs are counted in the status column and listed under
the table, never averaged in. A run with an unreadable or broken file is left out with a warning.
Columns: the keys that vary between settings, then best and last test score (top-1 for classifiers,
mIoU for segmenters: one report holds runs of one task), the teacher's, parameters, wall time, status."""

EPILOG = """\
examples:
  kd report outputs                                  every run under outputs/
  kd report outputs/multirun/2026-11-28/10-00-00-123456 --plot plots
  kd report outputs --where method=kd --where dataset.name=digits --sort=-best_top1
  kd report outputs --csv table.csv --markdown table.md"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the CLI (exit 2), not argparse's usage block
        raise KdError(f"kd report: {message} (see kd report --help)")


def build_parser() -> Parser:
    parser = Parser(
        prog="kd report",
        description=DESCRIPTION,
        epilog=EPILOG,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="run directories, sweep folders or an outputs folder (searched recursively)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs whose override, config group choice, saved config value or summary.json value "
        "KEY equals VALUE, e.g. method=kd, method.name=kd, status=complete, status=stale "
        "(repeat: all must hold)",
    )
    parser.add_argument(
        "--sort",
        metavar="COLUMN",
        help="sort rows by a column: a varying key, best_top1, last_top1, n, teacher_top1 (best_miou, ... for "
        "segmentation), params, wall_time_s or status; --sort=-COLUMN for descending",
    )
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV (mean and std apart)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table as Markdown")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="write PNGs: the metric against each swept numeric key, and training curves",
    )
    parser.add_argument(
        "--metric", choices=METRICS, help="the metric plotted (default best_top1, or best_miou for segmentation)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv / --markdown file")
    return parser


def check_outputs(args) -> None:
    """Where --csv, --markdown and --plot write, checked before any run is read: never over a file that
    exists (unless --overwrite), never into a run directory (it has one writer: its run)."""
    from kd_cli.engine.rundir import enclosing, holds_run, output_file

    for option in ("csv", "markdown"):
        if getattr(args, option) is not None:
            setattr(args, option, output_file(getattr(args, option), f"--{option}", args.overwrite, "--overwrite"))
    if args.plot is not None:
        target = args.plot.expanduser()
        run = target if holds_run(target) else enclosing(target, holds_run)
        if run is not None:
            raise KdError(
                f"--plot {target} is inside the run directory {run}, which only its run writes; write elsewhere"
            )
        if target.exists() and not target.is_dir():
            raise KdError(f"--plot {target} is a file; give a folder for the plots")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_outputs(args)
    conditions = [parse_where(text) for text in args.where]
    runs, reproductions, skipped = load_paths(args.paths)
    runs = filter_runs(runs, conditions)
    counted = sum(all(run.value(key) == value for key, value in conditions) for run in reproductions)
    report = build_report(runs, args.sort)
    extra = (
        [
            f"{counted} run(s) made by `kd reproduce` not counted (they repeat a run); "
            f"pass their reproduce/ folder to see them"
        ]
        if counted
        else []
    )
    # Left out, with a warning each; listed here too, so the table never looks complete when it is not.
    extra += [f"{left.status}, left out: {display_path(left.path)}  ({left.error})" for left in skipped]
    print_report(report, extra)
    write_outputs(report, args)
    return 0


def load_paths(paths: list[str]) -> tuple[list[Run], list[Run], list[Skipped]]:
    """(runs, reproductions left out, runs that could not be read). Each run directory is read once
    however many paths reach it. A run made by `kd reproduce` repeats a run with its seed: counted
    with it, it would fake a sample; it is kept only where a path holds nothing else (the user asked
    for it)."""
    found = [(given, find_run_dirs(given)) for given in paths]  # bad paths fail before any reading
    for given, run_dirs in found:
        if not run_dirs:
            raise no_runs_error([given])
    unique = dict.fromkeys(path for _, run_dirs in found for path in run_dirs)
    loaded = {path: load_or_skip(path) for path in unique}  # once each: one warning per left-out run
    skipped = [run for run in loaded.values() if isinstance(run, Skipped)]
    if len(skipped) == len(loaded):
        raise all_skipped_error(paths, len(loaded))
    kept: dict[Path, Run] = {}
    dropped: dict[Path, Run] = {}
    for _, run_dirs in found:
        readable = [run for run in (loaded[path] for path in run_dirs) if isinstance(run, Run)]
        originals = [run for run in readable if run.reproduction_of is None]
        kept.update((run.path, run) for run in originals or readable)
        dropped.update((run.path, run) for run in readable if originals and run.reproduction_of is not None)
    return list(kept.values()), [run for path, run in dropped.items() if path not in kept], skipped


def parse_where(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise KdError(f"--where {text}: expected KEY=VALUE, e.g. --where method.temperature=4")
    return key.strip().lstrip("+~"), canonical(value.strip())


def filter_runs(runs: list[Run], conditions: list[tuple[str, str]]) -> list[Run]:
    for key, value in conditions:
        kept = [run for run in runs if run.value(key) == value]
        if not kept:
            seen = sorted({run.value(key) or "(unset)" for run in runs})
            raise KdError(f"no run matches --where {key}={value} ({key} here: {', '.join(seen)})")
        runs = kept
    return runs


def write_outputs(report, args) -> None:
    if args.csv:
        write_csv(report, args.csv)
        print(f"table written to {display_path(args.csv)}")
    if args.markdown:
        write_markdown(report, args.markdown)
        print(f"table written to {display_path(args.markdown)}")
    if args.plot:
        from kd_cli.commands.report.plots import write_plots

        metric = args.metric or f"best_{report.metric}"
        if not metric.endswith(f"_{report.metric}"):
            raise KdError(
                f"--metric={metric} does not score these runs; use best_{report.metric} or last_{report.metric}"
            )
        try:
            written = write_plots(report, metric, args.plot.expanduser())
        except OSError as error:
            raise KdError(f"cannot write plots to {args.plot}: {error.strerror or error}") from None
        for path in written:
            print(f"plot written to {display_path(path)}")
        if not any(path.name.startswith(metric) for path in written):
            print(f"no {metric} plot: no swept key with numeric values varies between the settings")
