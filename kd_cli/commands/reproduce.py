"""`kd reproduce RUN_DIR [overrides...]`: run a saved run again, into a new run directory, and
compare its final metrics with the original's (exit 0 when identical, 1 when not).

Before running, the config is recomposed from the saved overrides with today's code and config
files and compared with the saved config_resolved.yaml: a default changed since (in kd or in a user
config folder) is listed, since it changes what the run computes. Changed package versions or git
commit are warned about. kd is deterministic on CPU (same seed, same metrics), so an unchanged set-up
reproduces exactly; elsewhere `--tolerance` allows a small numeric difference.

Every saved file is read strictly: one that is there but unreadable or broken (not valid YAML/JSON,
the wrong shape) stops the command with one line naming it, before anything is started, rather than
reproduce a different run (a broken overrides.yaml is not "no overrides"). The rerun is a child `kd`
process: stopping `kd reproduce` (Ctrl-C, SIGTERM, SIGHUP) stops the child too and waits for it to
record `interrupted`. The new run directory has one writer at a time: `kd reproduce` writes its
reproduce.json there (under the directory's lock) only before the child starts and after it ends.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kd_cli.commands.report.discover import (
    CONFIG,
    HYDRA,
    METRICS,
    OVERRIDES,
    REPRODUCTION,
    SUMMARY,
    BrokenFile,
    impossible_value,
    read_json,
    read_metrics,
    read_yaml,
    run_status,
)
from kd_cli.errors import KdError, warn
from kd_cli.stages import STAGES

PACKAGE_CONFIGS = "kd_cli.configs"
REPRODUCIBLE = [name for name, stage in STAGES.items() if stage.reproducible]
# Overrides that say where the original run lived, not what it computed: the reproduction is a new
# run in a new directory, never a continuation of the old one.
DROPPED_OVERRIDES = ("resume=", "hydra.")
# Config keys that legitimately differ: `resume` names the original's own directory when it was
# resumed. Values built from ${now:...} (time), ${hydra:...} (the run directory, job number) or
# ${oc.env:...} (the shell) are found from the config itself and skipped too.
IGNORED_CONFIG_KEYS = {"resume"}
VOLATILE_RESOLVERS = ("${now:", "${hydra:", "${oc.env:")
ENV_VERSION_KEYS = ("kd", "python", "torch", "torchvision", "hydra", "git_sha")
# Compared after the run when the metrics differ: the likely causes.
ENV_CAUSES = {
    "data_fingerprint": "the data differ",
    "train_samples": "the data differ",
    "test_samples": "the data differ",
    "val_samples": "the data differ",
    "device": "another device",
    "world_size": "another process count",
}
SUMMARY_KEYS = (
    "best_top1",
    "best_epoch",
    "best_val_top1",
    "last_top1",
    "teacher_top1",
    "generations_top1",
    "top1",
    "top5",
    "nll",
    "ece",
    "teacher_agreement",
    # segmentation's scores
    *("best_miou", "best_val_miou", "last_miou", "teacher_miou", "pixel_acc", "miou", "mean_class_acc"),
    # detection's scores
    *("best_map", "best_val_map", "last_map", "teacher_map", "last_map50", "map", "map50", "map75", "mar100"),
)
TIMING_COLUMNS = {"seconds", "images_per_s"}  # wall-clock facts: never the same twice
SHOWN_DIFFERENCES = 20
EXIT_DIFFERENT = 1
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
ENV = "env.json"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the CLI (exit 2), not argparse's usage block
        raise KdError(f"kd reproduce: {message} (see kd reproduce --help)")


def build_parser() -> Parser:
    parser = Parser(
        prog="kd reproduce",
        allow_abbrev=False,
        description=(
            "Run a saved run again from its stage and overrides into a new run directory, then compare the final "
            "metrics (summary.json and metrics.csv without timings): exit 0 when identical, 1 when not."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to reproduce")
    # OVERRIDE...: whatever is left after the options (see parse_arguments), so they may stand anywhere.
    parser.usage = "kd reproduce [-h] [--out DIR] [--tolerance ABS] RUN_DIR [OVERRIDE ...]"
    parser.epilog = "OVERRIDE: Hydra overrides applied after the saved ones, e.g. trainer.device=cpu"
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="put the new run under DIR/<date>/<time> (default: <paths.outputs>/reproduce)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        metavar="ABS",
        help="largest absolute difference counted as equal (default 0: identical)",
    )
    return parser


@dataclass
class SavedRun:
    path: Path
    stage: str
    overrides: list[str]
    config: dict[str, Any]  # config_resolved.yaml (.hydra/config.yaml, as composed, when that is missing)
    config_resolved: bool = True  # False: config_resolved.yaml is missing, the config cannot be compared
    hydra: dict[str, Any] = field(default_factory=dict)  # .hydra/hydra.yaml's `hydra` node
    summary: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"  # the true status (`stale` when it says running but nobody holds it)
    metrics: list[dict[str, float | str]] = field(default_factory=list)

    @property
    def original_cwd(self) -> str | None:
        return (self.hydra.get("runtime") or {}).get("cwd")

    @property
    def cwd(self) -> Path:
        """Where it ran: relative paths in its overrides and summary are relative to it."""
        cwd = self.original_cwd
        return Path(cwd) if cwd and Path(cwd).is_dir() else Path.cwd()

    @property
    def config_name(self) -> str:
        return (self.hydra.get("job") or {}).get("config_name") or STAGES[self.stage].config

    @property
    def user_config_dirs(self) -> list[str]:
        """Folders given with `-cd` (Hydra records them as command-line config sources)."""
        sources = (self.hydra.get("runtime") or {}).get("config_sources") or []
        return [
            s["path"]
            for s in sources
            if isinstance(s, dict)
            and s.get("provider") == "command-line"
            and s.get("schema") == "file"
            and s.get("path")
        ]

    def replay_overrides(self) -> list[str]:
        return [o for o in self.overrides if not o.lstrip("+~").startswith(DROPPED_OVERRIDES)]

    def absolute(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.cwd / path


def load_saved_run(given: str) -> SavedRun:
    path = Path(given).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise KdError(f"{given} is a file; give the run directory it belongs to")
    if not path.is_dir():
        raise KdError(f"{given}: no such directory")
    try:
        return _read_saved_run(given, path)
    except BrokenFile as error:
        what = "get read access to it" if error.unreadable else "the run's record is damaged"
        raise KdError(f"cannot reproduce {given}: its {error}; {what} (nothing was started)") from None


def _read_saved_run(given: str, path: Path) -> SavedRun:
    """Every saved file, strictly (BrokenFile); a missing optional one (hydra.yaml, env.json) is fine."""
    overrides, hydra_config = read_yaml(path, OVERRIDES, list), read_yaml(path, HYDRA_CONFIG, dict)
    if overrides is None or hydra_config is None:
        hint = (
            "; it is a sweep folder: give one of its numbered run directories"
            if (path / "multirun.yaml").exists()
            else "; give a run directory such as outputs/distill/<date>/<time>"
        )
        raise KdError(f"{given} is not a kd run directory (no .hydra/overrides.yaml and config.yaml){hint}")
    if not all(isinstance(o, str) for o in overrides):
        raise BrokenFile(path / OVERRIDES, str(OVERRIDES), "holds something other than a list of overrides")
    stage = hydra_config.get("stage")
    if stage not in STAGES or not STAGES[stage].reproducible:
        if isinstance(stage, str) and stage:
            raise KdError(
                f"{given} is a kd {stage} run; kd reproduce reruns {', '.join(REPRODUCIBLE)} runs and compares their "
                "metrics (an import or export checks itself against its source when it runs)"
            )
        raise KdError(f"{given}: its .hydra/config.yaml names no kd stage (stage: {stage})")
    config = read_yaml(path, CONFIG, dict)
    summary = read_json(path, SUMMARY)
    if summary is not None and (problem := impossible_value(summary)):
        raise BrokenFile(path / SUMMARY, SUMMARY, problem)
    if config is None and summary is None:
        raise KdError(f"{given}: the run stopped before it started (no config_resolved.yaml); nothing to reproduce")
    hydra = read_yaml(path, HYDRA, dict)
    node = hydra.get("hydra") if hydra is not None else {}
    if not isinstance(node, dict) or not all(isinstance(node.get(key) or {}, dict) for key in ("runtime", "job")):
        raise BrokenFile(path / HYDRA, str(HYDRA), "is not Hydra's record of the run (no hydra.runtime/job mappings)")
    return SavedRun(
        path=path,
        stage=stage,
        overrides=overrides,
        config=config if config is not None else hydra_config,
        config_resolved=config is not None,
        hydra=node,
        summary=summary or {},
        env=read_json(path, ENV) or {},
        status=run_status(path, summary),
        metrics=read_metrics(path),  # read now: compared after the rerun, which must not start for nothing
    )


def check_complete(saved: SavedRun) -> None:
    if saved.status != "complete":
        if saved.status not in ("failed", "interrupted", "stale", "running"):
            raise KdError(
                f"{saved.path} has the status {saved.status!r}, which kd does not write: the run's record is "
                "damaged (nothing was started)"
            )
        finish = f" (kd {saved.stage} resume={saved.path})" if STAGES[saved.stage].resumes else ""
        raise KdError(
            f"{saved.path} is {saved.status}, not complete: it has no final metrics to compare with; "
            f"finish it first{finish}"
        )
    if STAGES[saved.stage].trains and not saved.metrics:
        what = "is missing" if not (saved.path / METRICS).is_file() else "holds no epoch"
        raise KdError(
            f"cannot reproduce {saved.path}: its {METRICS} {what}, so there is nothing to compare the "
            f"rerun with; the run's record is damaged (nothing was started)"
        )


# --- the config, then and now ------------------------------------------------------------------


def recompose(saved: SavedRun, overrides: list[str]) -> tuple[dict[str, Any], set[str]]:
    """Today's resolved config for the saved overrides (flattened), and the keys whose value comes from
    a resolver that gives another value in every run (time, run directory, environment)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from kd_cli.config import register_configs
    from kd_cli.overrides import flatten

    register_configs()
    # The stage configs live in the package; a `-cd` folder only adds options, exactly as the CLI's
    # search path does (package first, then the folder), so it is added to the search path.
    search = [f"file://{d}" for d in saved.user_config_dirs]
    extra = [f"hydra.searchpath=[{','.join(quote(s) for s in search)}]"] if search else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=PACKAGE_CONFIGS, version_base="1.3"):
            cfg = compose(saved.config_name, overrides=[*overrides, *extra])
    except Exception as error:  # noqa: BLE001 - Hydra raises many types; all mean "cannot recompose"
        from kd_cli.errors import one_line

        raise KdError(
            f"cannot recompose the config of {saved.path} from its overrides today: {one_line(error)}"
        ) from None
    raw = flatten(OmegaConf.to_container(cfg, resolve=False))
    volatile = {key for key, value in raw.items() if any(marker in str(value) for marker in VOLATILE_RESOLVERS)}
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in volatile:  # never resolved: ${hydra:...} cannot be outside a Hydra run
        OmegaConf.update(plain, key, None, force_add=True)
    return flatten(OmegaConf.to_container(plain, resolve=True)), volatile


def config_differences(saved: SavedRun, now: dict[str, Any], volatile: set[str]) -> list[str]:
    from kd_cli.overrides import flatten

    then = flatten(saved.config)
    keys = [k for k in dict.fromkeys([*then, *now]) if k not in volatile and k not in IGNORED_CONFIG_KEYS]
    absent = object()
    return [
        f"{key}: {_show(then.get(key, absent), absent)} → {_show(now.get(key, absent), absent)}"
        for key in keys
        if then.get(key, absent) != now.get(key, absent)
    ]


def missing_record_warnings(saved: SavedRun) -> list[str]:
    """What the comparison cannot cover because a file of the run's record is missing."""
    warnings = []
    if not saved.config_resolved:
        warnings.append(
            f"{saved.path / CONFIG} is missing: the config recomposed today cannot be compared with the one the "
            "run resolved (a default changed since would go unnoticed); the metrics are still compared"
        )
    if not saved.env:
        warnings.append(
            f"{saved.path / ENV} is missing: the versions, git commit, device and data fingerprint the run used "
            "cannot be compared with today's, so a difference in the metrics cannot be traced to them"
        )
    return warnings


def environment_warnings(saved: SavedRun) -> list[str]:
    from kd_cli.engine.rundir import environment

    now = environment()
    warnings = [
        f"{key} was {saved.env[key]} for the original run, now {now.get(key)}: results may differ"
        for key in ENV_VERSION_KEYS
        if key in saved.env and saved.env[key] != now.get(key)
    ]
    if saved.original_cwd and not Path(saved.original_cwd).is_dir():
        warnings.append(
            f"the run's working directory {saved.original_cwd} is gone: its relative paths are taken from {Path.cwd()}"
        )
    return warnings


# --- running it again ---------------------------------------------------------------------------


def pinned_teacher(saved: SavedRun, new_overrides: list[str]) -> list[str]:
    """`teacher.checkpoint=auto` picks the newest matching teacher, which may not be the one the run
    used: pin that one (summary.json's teacher_run), unless the user names a teacher."""
    teacher = saved.config.get("teacher") or {}
    if saved.stage != "distill" or teacher.get("checkpoint") != "auto" or not saved.summary.get("teacher_run"):
        return []
    if any(o.lstrip("+~").startswith("teacher.checkpoint=") for o in new_overrides):
        return []
    path = saved.absolute(saved.summary["teacher_run"])
    if not path.exists():
        raise KdError(
            f"the teacher the run used ({path}) is gone; give one with teacher.checkpoint=PATH "
            f"(the metrics will then differ)"
        )
    print(f"teacher: pinned to the original run's teacher {path} (its teacher.checkpoint was auto)")
    return [f"teacher.checkpoint={quote(str(path))}"]


def new_run_dir(saved: SavedRun, out: Path | None, overrides: list[str]) -> Path:
    """A new, empty run directory, created here: never one another run (or reproduction) uses. Under --out,
    else under paths.outputs (this command's override of it, else the run's own)."""
    from kd_cli.overrides import override_map

    given = override_map(overrides).get("paths.outputs")
    outputs = (
        Path(given).expanduser().absolute()
        if given
        else saved.absolute(str((saved.config.get("paths") or {}).get("outputs", "outputs")))
    )
    parent = out.expanduser().absolute() if out else outputs / "reproduce"
    existing = next(folder for folder in (parent, *parent.parents) if folder.exists())
    while True:
        now = datetime.now()
        run_dir = parent / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
        try:
            run_dir.mkdir(parents=True)
            _MADE_FROM[run_dir] = existing
            return run_dir
        except FileExistsError:  # taken in the same microsecond: take the next
            continue
        except OSError as error:
            raise KdError(
                f"cannot create the run directory {run_dir} ({(error.strerror or str(error)).lower()}); "
                f"choose another folder with --out"
            ) from None


def reproduction_command(saved: SavedRun, overrides: list[str], run_dir: Path) -> list[str]:
    flags = [arg for d in saved.user_config_dirs for arg in ("-cd", d)]
    if saved.config_name != STAGES[saved.stage].config:
        flags += ["-cn", saved.config_name]
    return [sys.executable, "-m", "kd_cli", saved.stage, *flags, *overrides, f"hydra.run.dir={quote(str(run_dir))}"]


def run_stage(saved: SavedRun, command: list[str], run_dir: Path) -> None:
    """The real CLI in a child process, from the original's working directory (its relative paths).
    Interrupted, the child is stopped and waited for (it records `interrupted`), then
    KeyboardInterrupt goes on to the CLI (exit 130)."""
    from kd_cli.engine.process import run_child

    print(f"running: kd {' '.join(command[3:])}", flush=True)
    try:
        done = run_child(command, cwd=saved.cwd)
    except KeyboardInterrupt:
        where = (
            "it had not started: nothing kept"
            if discard_if_unstarted(run_dir)
            else f"its run directory {run_dir} keeps what the run recorded"
        )
        print(f"reproduction interrupted; {where}", flush=True)
        raise
    errors = (done.stderr or "").strip()
    if done.returncode != 0:
        reason = errors.splitlines()[-1].removeprefix("kd: error: ") if errors else f"exit status {done.returncode}"
        where = "it wrote nothing" if discard_if_unstarted(run_dir) else f"run directory {run_dir}"
        raise KdError(f"the reproduction failed: {reason} ({where})")
    if errors:
        print(errors, file=sys.stderr)


def discard_if_unstarted(run_dir: Path) -> bool:
    """Remove the new run directory if the child wrote nothing there, and the folders made for it that are
    left empty (its date folder, an --out folder that did not exist): a reproduction that never started
    leaves no directory behind. Called only once the child has ended."""
    try:
        if {p.name for p in run_dir.iterdir()} - {REPRODUCTION}:
            return False
        (run_dir / REPRODUCTION).unlink(missing_ok=True)
        run_dir.rmdir()
        existed = _MADE_FROM.get(run_dir, run_dir.parent.parent)
        folder = run_dir.parent
        while folder != existed and existed in folder.parents:
            folder.rmdir()  # (only an empty one: an OSError ends the climb)
            folder = folder.parent
    except OSError:
        pass
    return not run_dir.exists()


_MADE_FROM: dict[Path, Path] = {}  # new run directory -> the nearest folder above it that existed before


def quote(value: str) -> str:
    """A Hydra override value: plain when it can be, else single-quoted (spaces, commas, brackets...)."""
    if re.fullmatch(r"[\w./:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- comparing the results ----------------------------------------------------------------------


def metric_differences(saved: SavedRun, new: Path, tolerance: float) -> tuple[list[str], int]:
    """(differences as `what: original → new`, how many values were compared)."""
    differences, compared = _summary_differences(saved.summary, _read_new(new, SUMMARY), tolerance)
    before, after = saved.metrics, _read_new(new, METRICS)
    if len(before) != len(after):
        differences.append(f"metrics.csv: {len(before)} epochs → {len(after)}")
    for old_row, new_row in zip(before, after):
        for column in dict.fromkeys([*old_row, *new_row]):
            if column in TIMING_COLUMNS:
                continue
            compared += 1
            if not same(old_row.get(column), new_row.get(column), tolerance):
                epoch = _show(old_row.get("epoch", "?"))
                differences.append(
                    f"metrics.csv epoch {epoch} {column}: {_show(old_row.get(column))} → {_show(new_row.get(column))}"
                )
    return differences, compared


def _read_new(run_dir: Path, name: str) -> Any:
    """A file the reproduction wrote: {} / [] when it is not there."""
    try:
        return read_metrics(run_dir) if name == METRICS else read_json(run_dir, name) or {}
    except BrokenFile as error:
        raise KdError(f"cannot compare: the reproduction's {error} (run directory {run_dir})") from None


def _summary_differences(before: dict[str, Any], after: dict[str, Any], tolerance: float) -> tuple[list[str], int]:
    keys = [key for key in SUMMARY_KEYS if key in before or key in after]
    differences = [
        f"summary.json {key}: {_show(before.get(key))} → {_show(after.get(key))}"
        for key in keys
        if not same(before.get(key), after.get(key), tolerance)
    ]
    return differences, len(keys)


def likely_causes(saved: SavedRun, new: Path) -> list[str]:
    before, after = saved.env, _read_new(new, ENV)
    return [
        f"env.json {key}: {before.get(key)} → {after.get(key)} ({cause})"
        for key, cause in ENV_CAUSES.items()
        if key in before and before.get(key) != after.get(key)
    ]


def same(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tolerance) for x, y in zip(a, b))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return a == b
    if math.isnan(a) or math.isnan(b):  # a NaN loss reproduced is a NaN loss
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tolerance


def _show(value: Any, absent: Any = None) -> str:
    if absent is not None and value is absent:
        return "(absent)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


# --- the command --------------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    if args.tolerance < 0:
        parser.error(f"--tolerance {args.tolerance}: must be 0 or more")
    return args


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    saved = load_saved_run(args.run_dir)
    check_complete(saved)
    overrides = saved.replay_overrides()
    for warning in [*missing_record_warnings(saved), *environment_warnings(saved)]:
        warn(warning)
    changed = config_differences(saved, *recompose(saved, overrides)) if saved.config_resolved else []
    if saved.config_resolved:
        report_config(changed)
    extra = [*pinned_teacher(saved, args.overrides), *args.overrides]
    # (an interrupt here, Ctrl-C, SIGTERM or SIGHUP, stops the child too: see engine/process.run_child)
    run_dir = new_run_dir(saved, args.out, args.overrides)  # everything that can refuse has refused: create it now
    command = reproduction_command(saved, [*overrides, *extra], run_dir)
    facts = dict(reproduces=str(saved.path), command=command[3:], config_differences=changed)
    record(run_dir, **facts)  # before the child starts: it marks the run as a reproduction from the start
    run_stage(saved, command, run_dir)
    differences, compared = metric_differences(saved, run_dir, args.tolerance)
    record(run_dir, **facts, identical=not differences, differences=differences)  # the child has ended
    return report_result(saved, run_dir, differences, compared, args.tolerance)


def report_config(changed: list[str]) -> None:
    if not changed:
        print("config: recomposed today from the saved overrides, it equals the saved config_resolved.yaml")
        return
    print(
        f"config: {len(changed)} value(s) differ from the saved config_resolved.yaml "
        f"(code or config files changed since; saved → now):"
    )
    for line in changed:
        print(f"  {line}")


def report_result(saved: SavedRun, run_dir: Path, differences: list[str], compared: int, tolerance: float) -> int:
    if not differences:
        how = "identical" if tolerance == 0 else f"equal within {tolerance}"
        print(
            f"reproduced: the final metrics are {how} ({compared} values: summary.json and metrics.csv "
            f"without timings); new run {run_dir}"
        )
        return 0
    print("differences (original → reproduction):")
    for line in differences[:SHOWN_DIFFERENCES]:
        print(f"  {line}")
    if len(differences) > SHOWN_DIFFERENCES:
        print(f"  ... and {len(differences) - SHOWN_DIFFERENCES} more")
    for line in likely_causes(saved, run_dir):  # the likely cause, when it is the data
        print(f"  {line}")
    print(
        f"not reproduced: {len(differences)} of {compared} compared values differ from the original run "
        f"{saved.path}; new run {run_dir}"
    )
    return EXIT_DIFFERENT


def record(run_dir: Path, **facts: Any) -> None:
    """reproduce.json in the new run: what it reproduces (kd report keeps it out of the averages).
    Written under the directory's lock, so never while another process (the child) writes there."""
    from kd_cli.engine.files import write_json
    from kd_cli.engine.lock import DirectoryLock

    lock = DirectoryLock.acquire(run_dir, "kd reproduce records its result only when the run has ended")
    try:
        write_json(run_dir / REPRODUCTION, facts)
    finally:
        lock.release()
