"""`resume=RUN_DIR`: continue an unfinished run in its own directory with its own overrides.

Handled before Hydra starts because the run directory and the overrides are Hydra's inputs:
the saved overrides come first, the new ones after (so `trainer.device=cpu` may still change),
and `hydra.run.dir` points back at the run. A directory that already holds a run is never
reused by accident: without `resume=` kd refuses to write into it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from kd_cli.engine.checkpoint import LAST
from kd_cli.engine.rundir import SUMMARY, read_summary
from kd_cli.errors import KdError

RUN_DIR_KEY = "hydra.run.dir="


def _value(args: list[str], prefix: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(prefix)]
    return values[-1] if values else None


def resume_arguments(stage: str, args: list[str]) -> list[str]:
    target = _value(args, "resume=")
    if target in (None, "", "null", "None"):
        return _rank_arguments(args)
    run = Path(target).expanduser()
    saved = run / ".hydra" / "overrides.yaml"
    if not saved.exists():
        raise KdError(f"resume={target}: no kd run there (missing {saved}); give the run directory to continue")
    status = read_summary(run).get("status")
    if status == "complete":
        raise KdError(f"resume={target}: that run is already complete; start a new run instead")
    saved_stage = yaml.safe_load((run / ".hydra" / "config.yaml").read_text()).get("stage")
    if saved_stage != stage:
        raise KdError(f"resume={target} is a {saved_stage} run; continue it with `kd {saved_stage} resume={target}`")
    previous = [o for o in yaml.safe_load(saved.read_text()) or [] if not o.startswith(("resume=", RUN_DIR_KEY))]
    fresh = [a for a in args if not a.startswith(("resume=", RUN_DIR_KEY))]
    return _rank_arguments([*previous, *fresh, f"resume={run}", f"{RUN_DIR_KEY}{run}"])


def guard_run_dir(args: list[str]) -> None:
    """Refuse `hydra.run.dir=DIR` when DIR holds a run and this is not `resume=DIR`."""
    target = _value(args, RUN_DIR_KEY)
    if target is None or _value(args, "resume=") not in (None, "null"):
        return
    run = Path(target)
    if (run / SUMMARY).exists() or (run / LAST).exists():
        raise KdError(f"{run} already holds a run; continue it with resume={run} or choose another directory")


def _rank_arguments(args: list[str]) -> list[str]:
    """Under torchrun only rank 0 writes the run directory; the other ranks log to a scratch one."""
    if int(os.environ.get("RANK", "0")) == 0:
        return args
    scratch = tempfile.mkdtemp(prefix=f"kd-rank{os.environ['RANK']}-")
    return [*args, f"{RUN_DIR_KEY}{scratch}", "hydra.output_subdir=null"]
