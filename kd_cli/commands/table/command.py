"""`kd table NAME [--small] [--report] [key=value...] [OVERRIDE...]`: a literature table as one command.

Runs the grid a table describes (kd_cli/table/NAME.yaml: teacher/student pairs x methods x seeds), each
teacher once per architecture, each (pair, method) as one multirun over the seeds through the Hydra
launcher the overrides choose; a cell already complete is kept, a stopped one resumed. Then sets kd's
mean ± std (best and last epoch) beside the published figure of each cell, with its source, marks it
reproduced / below / above within `tolerance`, and writes table.csv, table.md and table.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from kd_cli.commands.table.recipe import Pair, TableRecipe, builtin_tables, check_choices, load_recipe
from kd_cli.console import print_table
from kd_cli.errors import KdError, note_interruption

KEYS = ("out", "methods", "pairs", "seeds", "tolerance", "compare")
# Config groups and keys each cell's recipe sets: an override of them would change what the table compares.
SET_BY_THE_TABLE = ("teacher", "student", "method", "experiment")
RECORD = "table.json"  # in out=: the overrides the grid's runs were started with
EPILOG = """\
examples:
  kd table cifar100                                       the whole grid (a GPU and CIFAR-100 needed)
  kd table cifar100 methods=kd,dkd seeds=5 hydra/launcher=joblib trainer.device=cuda
  kd table cifar100 hydra/launcher=submitit_slurm          every seed of a cell a SLURM job
  kd table cifar100 --small                               the machinery in minutes on a CPU (synthetic data)
  kd table cifar100 --report                              the table from the runs there, nothing trained
Any other key=value is a Hydra override given to every kd run (dataset.root=..., trainer.device=cuda)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the CLI (exit 2), not argparse's usage block
        raise KdError(f"kd table: {message} (see kd table --help)")


@dataclass
class Cell:
    pair: str
    method: str
    best: list[float]
    last: list[float]
    published: float | None
    source: str | None
    status: str
    delta: float | None


def build_parser() -> Parser:
    parser = Parser(
        prog="kd table",
        usage="kd table NAME|FILE.yaml [--small] [--report] [key=value...] [OVERRIDE...]",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EPILOG,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", help=f"a built-in table ({', '.join(builtin_tables())}) or a YAML file")
    parser.add_argument("--small", action="store_true", help="the table's small grid: minutes on a CPU")
    parser.add_argument("--report", action="store_true", help="only tabulate the runs already in out=")
    parser.add_argument("--out", help="where the runs and the table go (outputs/table/NAME[-small])")
    parser.add_argument("--methods", help="comma-separated methods (the table's list)")
    parser.add_argument("--pairs", help="comma-separated pairs (the table's list)")
    parser.add_argument("--seeds", type=int, help="runs per cell (the table's count)")
    parser.add_argument(
        "--tolerance", type=float, help="points (of the table's metric) within which a cell is reproduced"
    )
    parser.add_argument("--compare", help="best | last: the epoch compared with the published figure")
    return parser


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments as flags, Hydra overrides for every kd run)."""
    own, overrides = [], []
    for word in argv:
        key, sep, value = word.partition("=")
        if sep and key in KEYS:
            own += [f"--{key}", value]
        elif sep and not word.startswith("-"):
            bare = key.lstrip("+~")
            if bare in ("seed", "hydra.sweep.dir", "hydra.run.dir", "resume"):
                raise KdError(f"kd table sets {key} itself for each run; use seeds=N and out=DIR")
            if bare.split(".")[0] in SET_BY_THE_TABLE and not bare.startswith(
                ("method.", "teacher.kwargs.", "student.kwargs.")
            ):
                raise KdError(
                    f"kd table sets {bare} itself from the table's pairs and methods; choose them with "
                    "pairs=NAME,... and methods=NAME,... (method.X= and the models' kwargs reach every run)"
                )
            overrides.append(word)
        else:
            own.append(word)
    return own, overrides


def main(argv: list[str]) -> int:
    own, overrides = split_arguments(argv)
    args = build_parser().parse_args(own)
    recipe = choose(load_recipe(args.name), args)
    out = (
        Path(args.out or Path("outputs") / "table" / f"{recipe.name}{'-small' if args.small else ''}")
        .expanduser()
        .absolute()
    )
    if args.report and overrides:
        raise KdError(
            f"--report only tabulates the runs in {out}; {' '.join(overrides)} would change nothing: drop them"
        )
    check_out(out)
    if args.small:
        overrides = [*recipe.small.get("overrides", []), *overrides]
    failures = [] if args.report else run_grid(recipe, out, overrides)
    cells = collect(recipe, out)
    failed = (
        f"{len(failures)} of the grid's runs failed ({'; '.join(failures[:3])}); fix the cause and run the same "
        "command again to resume"
    )
    if not any(cell.best for cell in cells):
        if failures:
            raise KdError(failed)
        raise KdError(
            f"no complete run in {out}; run `kd table {args.name}{' --small' if args.small else ''}` "
            "without --report first"
        )
    write_outputs(recipe, cells, out)
    if failures:
        raise KdError(f"{failed} (the table shows the rest)")
    return 0


def check_out(out: Path) -> None:
    """out= is a table's own folder: new, empty, or one a kd table wrote (its record, teachers/, runs/ and
    the table files). Never a run directory or inside one, never a folder of other files (a data set's
    class folders took runs/ and teachers/ as two more classes)."""
    from kd_cli.engine.rundir import holds_run, holds_sweep

    inside = next((p for p in (out, *out.parents) if holds_run(p) or holds_sweep(p)), None)
    if inside is not None:
        raise KdError(f"out={out} is inside the run or sweep folder {inside}; give a folder of its own to the table")
    if out.is_file():
        raise KdError(f"out={out} is a file; give a folder for the table")
    own = {RECORD, "teachers", "runs", "table.csv", "table.md", "table.png"}
    others = sorted(p.name for p in out.iterdir() if p.name not in own) if out.is_dir() else []
    if others:
        raise KdError(
            f"out={out} holds other files ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); give a new "
            "folder, or the one a kd table wrote"
        )


def choose(recipe: TableRecipe, args: argparse.Namespace) -> TableRecipe:
    """The table, its small grid with --small, and what the command line changes."""
    from kd_cli.methods import METHODS

    recipe = recipe.shrunk() if args.small else recipe
    if args.methods is not None:
        recipe.methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if args.pairs is not None:
        names = list(dict.fromkeys(p.strip() for p in args.pairs.split(",") if p.strip()))
        if not names:
            raise KdError("pairs= is empty; give pairs=NAME,... (the table's pairs, or leave pairs= out)")
        unknown = [name for name in names if name not in recipe.pairs]
        if unknown:
            raise KdError(f"pairs: {', '.join(unknown)} not in the table ({', '.join(recipe.pairs)})")
        recipe.pairs = {name: recipe.pairs[name] for name in names}
    for key in ("seeds", "tolerance", "compare"):
        if getattr(args, key) is not None:
            setattr(recipe, key, getattr(args, key))
    check_choices(recipe)
    unknown = [m for m in recipe.methods if m not in METHODS]
    if unknown:
        raise KdError(f"methods: {', '.join(unknown)} unknown (choose from: {', '.join(METHODS.names())})")
    return recipe


# ------------------------------------------------------------------------------------------------ the grid


def run_grid(recipe: TableRecipe, out: Path, overrides: list[str]) -> list[str]:
    """Train what is not complete yet; the names of the runs that failed."""
    from kd_cli.methods import method_requires_teacher

    jobs = (
        []
        if not any(map(method_requires_teacher, recipe.methods))
        else [
            teacher_job(recipe, arch, out / "teachers" / arch, overrides)
            for arch in dict.fromkeys(pair.teacher for pair in recipe.pairs.values())
        ]
    )
    jobs += [
        cell_job(recipe, pair, method, out, overrides, method_requires_teacher(method))
        for pair in recipe.pairs.values()
        for method in recipe.methods
    ]
    check_jobs(fresh_jobs(recipe, out, overrides))  # every run's config, complete cells' too: a bad override is refused
    check_same_overrides(out, overrides)
    todo = [job for job in jobs if job is not None]
    failures: list[str] = []
    seen: set[str] = set()  # warnings said once for the grid, not once per run (14 times, the same line)
    for number, (name, args) in enumerate(todo, 1):
        print(f"kd table [{number}/{len(todo)}] {name}: kd {' '.join(args)}", flush=True)
        try:
            error = run_kd(args, seen)
        except KeyboardInterrupt:
            note_interruption(f"interrupted while {name} ran; run the same kd table command again to resume the grid")
            raise
        if error is not None:
            failures.append(f"{name}: {error}")
    return failures


def check_jobs(jobs: list[tuple[str, list[str]]]) -> None:
    """Every job's config composed and checked as its stage checks it (names, types, ranges), before
    the first job runs: a bad override, which every job would refuse in turn, is one line, once."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from kd_cli.config import register_configs
    from kd_cli.errors import one_line
    from kd_cli.overrides import prepare_overrides
    from kd_cli.stages.checks import check_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="kd_cli.configs", version_base="1.3"):
        for name, (stage, *words) in jobs:
            if any(word.startswith("resume=") for word in words):
                continue  # checked when it first ran
            # (the teachers a cell names are trained by the grid's first jobs: not there yet)
            left_out = ("hydra.", "teacher.checkpoint=")
            job = [_first_seed(w) for w in words if w != "-m" and not w.lstrip("+~").startswith(left_out)]
            try:
                check_config(compose(stage.replace("-", "_"), overrides=prepare_overrides(job)), list(job))
            except Exception as error:  # noqa: BLE001 - Hydra's and kd's refusals alike: the job cannot run
                raise KdError(f"{name}: {one_line(error)}; no run was started") from None
    GlobalHydra.instance().clear()


def fresh_jobs(recipe: TableRecipe, out: Path, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """Every run of the grid as it would start today, finished or not (what check_jobs composes)."""
    from kd_cli.methods import method_requires_teacher

    arches = dict.fromkeys(pair.teacher for pair in recipe.pairs.values())
    jobs = [
        (f"teacher {arch}", ["train-teacher", *recipe.teacher_recipe, f"teacher.arch={arch}", *overrides])
        for arch in arches
    ]
    for pair in recipe.pairs.values():
        for method in recipe.methods:
            teacher = ["teacher.checkpoint=auto"] if method_requires_teacher(method) else []
            jobs.append(
                (f"{pair.name} {method}", ["distill", *method_recipe(recipe, pair, method), *teacher, *overrides])
            )
    return jobs


def check_same_overrides(out: Path, overrides: list[str]) -> None:
    """The grid's runs all run with the same overrides: a rerun of a table in the same out= with other ones
    would mix two settings in one table (its finished cells are kept as they are). The first run's are
    recorded in out/table.json."""
    from kd_cli.engine.files import read_json, write_json

    record = out / RECORD
    try:
        before = read_json(record).get("overrides") if record.exists() else None
    except (OSError, ValueError, AttributeError):
        raise KdError(f"{record} is damaged; restore it, or use another out=") from None
    if before is not None and _what_runs(before) != _what_runs(overrides):
        then, now = " ".join(before) or "(none)", " ".join(overrides) or "(none)"
        raise KdError(
            f"{out} holds a table run with other overrides ({then}; now {now}): its finished cells would be "
            "mixed with runs of another setting; use another out=, or the same overrides"
        )
    if before is None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(record, {"overrides": list(overrides)})


def _what_runs(overrides: list[str]) -> dict[str, str]:
    """The overrides that decide what a run computes: not where or how it runs (the keys a resume may
    change too: progress, device, workers, data folder, trackers, the teacher cache)."""
    from kd_cli.overrides import canonical, override_map
    from kd_cli.stages.claim import FREE_ON_RESUME

    free = lambda key: any(key == k or key.startswith(k + ".") for k in FREE_ON_RESUME)  # noqa: E731
    return {key: canonical(value) for key, value in override_map(list(overrides)).items() if not free(key)}


def _first_seed(word: str) -> str:
    return "seed=0" if word.startswith("seed=") else word


def run_kd(args: list[str], seen: set[str]) -> str | None:
    """One kd command in its own process, its progress shown as it comes; stopped with this one (an interrupt
    is passed on, and kill -9 of this process stops it too: engine/process.run_child). Its warnings are passed
    on once each (`seen`); its error line, if it failed, is returned for the table's own one line."""
    from kd_cli.engine.process import run_child

    done = run_child([sys.executable, "-m", "kd_cli", *args])
    lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
    for line in lines:
        if not line.startswith("kd: error: ") and line not in seen:
            seen.add(line)
            print(line, file=sys.stderr, flush=True)
    if done.returncode == 0:
        return None
    errors = [line.removeprefix("kd: error: ") for line in lines if line.startswith("kd: error: ")]
    return errors[-1] if errors else f"exit status {done.returncode}"


def teacher_job(recipe: TableRecipe, arch: str, run: Path, overrides: list[str]) -> tuple[str, list[str]] | None:
    from kd_cli.engine.rundir import holds_run, is_complete

    if is_complete(run):
        return None
    if holds_run(run):
        return f"teacher {arch}", ["train-teacher", f"resume={run}"]
    return f"teacher {arch}", [
        "train-teacher",
        *recipe.teacher_recipe,
        f"teacher.arch={arch}",
        *overrides,
        f"hydra.run.dir={run}",
    ]


def cell_job(
    recipe: TableRecipe, pair: Pair, method: str, out: Path, overrides: list[str], needs_teacher: bool
) -> tuple[str, list[str]] | None:
    """The multirun over the seeds of one cell, its resume, or None when every seed is complete."""
    from kd_cli.engine.rundir import holds_run, holds_sweep, is_complete

    sweep = out / "runs" / pair.name / method
    runs = [sweep / f"seed-{seed}" for seed in range(recipe.seeds)]
    if all(is_complete(run) for run in runs):
        return None
    name = f"{pair.name} {method}"
    held = [run for run in sweep.glob("seed-*") if holds_run(run)]
    if held:
        missing = [run.name for run in runs if not holds_run(run)]
        if missing:
            raise KdError(
                f"{sweep} holds a sweep without {', '.join(missing)} (seeds={recipe.seeds} asks for them); "
                "use another out= or the seeds it was started with"
            )
    if held or holds_sweep(sweep):  # (a sweep stopped before its first job began holds only its record)
        return name, ["distill", f"resume={sweep}"]
    teacher = [f"teacher.checkpoint={out / 'teachers' / pair.teacher}"] if needs_teacher else []
    seeds = ",".join(str(seed) for seed in range(recipe.seeds))
    return name, [
        "distill",
        "-m",
        *method_recipe(recipe, pair, method),
        f"seed={seeds}",
        *teacher,
        *overrides,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=seed-${seed}",
    ]


def method_recipe(recipe: TableRecipe, pair: Pair, method: str) -> list[str]:
    """The first of the table's method recipes whose experiment presets all exist."""
    for candidate in recipe.method_recipes:
        overrides = [o.replace("PAIR", pair.name).replace("METHOD", method) for o in candidate]
        if all(preset_exists(o.split("=", 1)[1]) for o in overrides if o.startswith("experiment=")):
            return overrides
    raise KdError(f"no recipe of table {recipe.name} has presets for {pair.name} with {method}")


def preset_exists(name: str) -> bool:
    return (files("kd_cli.configs") / "experiment" / f"{name}.yaml").is_file()


# ------------------------------------------------------------------------------------------------ the table


def collect(recipe: TableRecipe, out: Path) -> list[Cell]:
    """One cell per (pair, method), and the teacher of each pair, from the complete runs in `out`."""
    from kd_cli.engine.rundir import read_summary

    cells = []
    for pair in recipe.pairs.values():
        teacher = read_summary(out / "teachers" / pair.teacher)
        teacher_runs = [teacher] if teacher.get("status") == "complete" else []
        cells.append(make_cell(recipe, pair.name, "teacher", teacher_runs))
        for method in recipe.methods:
            summaries = [
                read_summary(out / "runs" / pair.name / method / f"seed-{seed}") for seed in range(recipe.seeds)
            ]
            cells.append(make_cell(recipe, pair.name, method, [s for s in summaries if s.get("status") == "complete"]))
    return cells


def make_cell(recipe: TableRecipe, pair: str, method: str, runs: list[dict]) -> Cell:
    best_key, last_key = f"best_{recipe.metric}", f"last_{recipe.metric}"
    best = [float(run[best_key]) for run in runs if run.get(best_key) is not None]
    last = [float(run[last_key]) for run in runs if run.get(last_key) is not None]
    figure = recipe.figure(method, pair)
    ours = best if recipe.compare == "best" else last
    if not ours:
        published, source = (figure.score, figure.source) if figure is not None else (None, None)
        return Cell(pair, method, best, last, published, source, "not run", None)
    if figure is None:
        return Cell(pair, method, best, last, None, None, "not published", None)
    delta = statistics.mean(ours) - figure.score
    status = "reproduced" if abs(delta) <= recipe.tolerance else ("below" if delta < 0 else "above")
    return Cell(pair, method, best, last, figure.score, figure.source, status, delta)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def rows(recipe: TableRecipe, cells: list[Cell]) -> list[dict[str, str]]:
    return [
        {
            "pair": c.pair,
            "method": c.method,
            "n": str(len(c.best)),
            "kd best": mean_std(c.best),
            "kd last": mean_std(c.last),
            "published": "-" if c.published is None else f"{c.published:.2f}",
            f"delta ({recipe.compare})": "-" if c.delta is None else f"{c.delta:+.2f}",
            "status": c.status,
            "source": c.source or "-",
        }
        for c in cells
    ]


def write_outputs(recipe: TableRecipe, cells: list[Cell], out: Path) -> None:
    from kd_cli.engine.files import atomic_write

    table = rows(recipe, cells)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "table.csv", lambda tmp: Path(tmp).write_text(as_csv(table)))
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(as_markdown(recipe, table)))
    plot(recipe, cells, out / "table.png")
    print_grid(recipe, table, cells)
    print(f"table written to {out / 'table.csv'}, {out / 'table.md'} and {out / 'table.png'}")


def as_csv(table: list[dict[str, str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def as_markdown(recipe: TableRecipe, table: list[dict[str, str]]) -> str:
    header = list(table[0])
    lines = [
        f"# {recipe.name}: kd beside the published figures",
        "",
        f"kd: mean ± std over the complete runs (n) of each cell; status compares the {recipe.compare} epoch's "
        f"mean with the published figure, within {recipe.tolerance} {recipe.metric_label} points.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    lines += ["| " + " | ".join(row[key] for key in header) + " |" for row in table]
    used = sorted({row["source"] for row in table if row["source"] != "-"})
    lines += ["", "Sources:", ""] + [f"- {key}: {recipe.sources[key]}" for key in used]
    return "\n".join(lines) + "\n"


def print_grid(recipe: TableRecipe, table: list[dict[str, str]], cells: list[Cell]) -> None:
    keys = [key for key in table[0] if key != "source"]
    counts = {status: sum(c.status == status for c in cells) for status in ("reproduced", "below", "above")}
    print_table(
        f"kd table {recipe.name} ({recipe.compare} epoch vs published, tolerance {recipe.tolerance})",
        [(key, "left" if key in ("pair", "method", "status") else "right") for key in keys],
        [[row[key] for key in keys] for row in table],
        notes=[", ".join(f"{n} {status}" for status, n in counts.items())],
        width=None if sys.stdout.isatty() else 160,
    )  # a log file gets whole rows


def plot(recipe: TableRecipe, cells: list[Cell], path: Path) -> None:
    """A grid of methods x pairs: the colour is kd minus published (green above, red below), the text kd's
    mean over the published figure; grey where there is no figure or no run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(dict.fromkeys(c.pair for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    grid = np.full((len(methods), len(pairs)), np.nan)
    fig, axes = plt.subplots(figsize=(1.6 + 1.5 * len(pairs), 1.2 + 0.45 * len(methods)))
    for cell in cells:
        i, j = methods.index(cell.method), pairs.index(cell.pair)
        ours = cell.best if recipe.compare == "best" else cell.last
        if cell.delta is not None:
            grid[i, j] = cell.delta
        text = f"{statistics.mean(ours):.1f}" if ours else "-"
        text += f"/{cell.published:.1f}" if cell.published is not None else ""
        axes.text(j, i, text, ha="center", va="center", fontsize=7)
    limit = max(3.0, float(np.nanmax(np.abs(grid))) if not np.all(np.isnan(grid)) else 3.0)
    colours = matplotlib.colormaps["RdYlGn"].copy()
    colours.set_bad("#dddddd")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=-limit, vmax=limit, aspect="auto")
    axes.set_xticks(
        range(len(pairs)), [f"{recipe.pairs[p].teacher}\n→ {recipe.pairs[p].student}" for p in pairs], fontsize=7
    )
    axes.set_yticks(range(len(methods)), methods, fontsize=8)
    axes.set_title(
        f"{recipe.name}: kd {recipe.compare} {recipe.metric_label} / published (colour: difference)", fontsize=9
    )
    fig.colorbar(image, ax=axes, label=f"kd - published ({recipe.metric_label} points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
