"""What every stage shares: the run directory's life cycle, device/data set-up, model building."""

from __future__ import annotations

import logging
import logging.handlers
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn

import kd_cli.compress  # noqa: F401  (registers how a compressed model is rebuilt: kd_cli/saved_forms)
from kd_cli.engine.artifacts import ModelSpec
from kd_cli.engine.device import (
    evaluation_precision,
    resolve_device,
    resolve_precision,
    seed_everything,
    use_channels_last,
)
from kd_cli.engine.distributed import World, init_distributed
from kd_cli.engine.files import atomic_write, read_json
from kd_cli.engine.lock import Owner
from kd_cli.engine.process import signals_held
from kd_cli.engine.rundir import ENV, FAILED, INTERRUPTED, RunDir
from kd_cli.errors import INTERRUPTED_RUNS, WARNINGS, KdError, hand_over, one_line, warn
from kd_cli.stages.claim import Claim, claim_run_dir

log = logging.getLogger("kd")
PEERS = "peers"  # online distillation: each of the student's peers is a model of its own in RUN/peers/NAME


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(stage_main: Callable[[DictConfig, RunDir], Any], cfg: DictConfig) -> Any:
    """Run a stage in its run directory, which it holds alone from its first to its last write.

    Nothing is written before the stage has checked every value and read its inputs (`start_run`);
    a run that then stops records `failed`/`interrupted` in summary.json. In a sweep a failed job is
    recorded and the others go on; the command exits non-zero at the end.
    """
    path = output_dir()
    WARNINGS.clear()  # this job's own (a sweep runs several jobs in one process)
    log_buffer = LogBuffer()
    started = time.time()
    run: RunDir | None = None
    claim: Claim | None = None
    try:
        claim = _claim(cfg, path)
        if claim.finished:  # a complete job of a resumed sweep
            log.info(f"{path}: complete already (best top-1 {claim.previous.get('best_top1')}); kept as it is")
            return claim.previous.get("best_top1")
        run = RunDir(path, claim.previous, claim.lock)
        if claim.resuming:
            run.keep(resumes=[*claim.previous.get("resumes", []), _resume_record(claim)])
        return stage_main(cfg, run)
    except KeyboardInterrupt as interrupt:
        with signals_held():  # a second Ctrl-C must not cut the record short
            if run is not None and run.record_stop(
                INTERRUPTED, f"interrupted; continue with resume={path}", time.time() - started
            ):
                INTERRUPTED_RUNS.append(str(path))
        hand_over(interrupt)
        raise
    except Exception as error:
        _hand_over(error, path, run, claim, time.time() - started, cfg)
        return None
    finally:
        if run is not None:
            run.close()
        if claim is not None:
            claim.lock.release()
        log_buffer.close()
        if run is None or not run.started:
            _remove_if_empty(path)


def _claim(cfg: DictConfig, path: Path) -> Claim:
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks write a scratch directory of their own
        return Claim(NoLock())  # type: ignore[arg-type]
    overrides = list(HydraConfig.get().overrides.task)
    return claim_run_dir(
        path,
        cfg.get("resume"),
        bool(cfg.get("resume_extend", False)),
        overrides,
        in_multirun(),
        resumable="resume" in cfg,
    )


class NoLock:
    def record_owner(self) -> None:
        pass

    def release(self) -> None:
        pass


def _hand_over(
    error: Exception, path: Path, run: RunDir | None, claim: Claim | None, seconds: float, cfg: DictConfig
) -> None:
    if run is not None and run.started:
        run.record_stop(FAILED, one_line(error), seconds)
    elif in_multirun() and claim is not None and not claim.resuming:
        # A sweep's job refused before it started still says so in its folder: launchers that run jobs
        # in other processes (joblib, SLURM) learn the sweep's outcome from the jobs' summaries.
        RunDir(path).write_summary(FAILED, stage=cfg.stage, error=one_line(error), started_run=False)
    if in_multirun():
        # the sweep goes on with its other jobs; its one `kd: error:` line comes when it ends
        started = run is not None and run.started
        what = "failed" if started else "was refused before it started"
        # (logged, on the console's stdout: stderr keeps the sweep's one error line for its end)
        log.warning(f"kd: warning: job {path} {what}: {one_line(error)}; the sweep goes on with its other jobs")
        error = KdError(
            f"a job of the sweep failed ({path}): {one_line(error)}" if started else f"{one_line(error)} (job {path})"
        )
    hand_over(error)


def _resume_record(claim: Claim) -> dict[str, Any]:
    owner = Owner.me()
    return {"at": owner.started, "host": owner.host, "pid": owner.pid, "changes": claim.changes}


def _remove_if_empty(path: Path) -> None:
    """A run that never started leaves no run directory behind. (The date folders above it are left:
    removing them could pull the floor from under another run being created in them at that moment.)"""
    try:
        path.rmdir()  # removes only an empty directory
    except OSError:
        pass


class LogBuffer:
    """Holds the job's log records until its run directory is written, then writes them (and every
    later record) to `<stage>.log` there; a job that never starts its run leaves no log file."""

    current: LogBuffer | None = None

    def __init__(self) -> None:
        self.memory = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.file: logging.Handler | None = None
        logging.getLogger().addHandler(self.memory)
        LogBuffer.current = self

    def write_to(self, path: Path) -> None:
        # (backslashreplace: a file name that is not UTF-8 is logged with \xNN escapes, not a logging error)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
        self.file.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        self.memory.setTarget(self.file)
        self.memory.flush()
        logging.getLogger().removeHandler(self.memory)
        logging.getLogger().addHandler(self.file)

    def close(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.memory)
        self.memory.setTarget(None)
        self.memory.close()
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()
        LogBuffer.current = None


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype  # training's autocast dtype
    world: World
    eval_dtype: torch.dtype  # evaluation's (device.evaluation_precision)


def setup_run(cfg: DictConfig) -> Setup:
    """Every value checked, then seed, device, precision, process group. Writes nothing."""
    from kd_cli.stages.checks import check_config

    check_config(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    dtype = resolve_precision(cfg.trainer.precision, device)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    world = init_distributed(device)
    return Setup(device, dtype, world, evaluation_precision(cfg.trainer.precision, device, dtype))


def start_run(cfg: DictConfig, run: RunDir, setup: Setup | None, **env: Any) -> None:
    """From here on the run directory is written: .hydra/, config_resolved.yaml, env.json, a `running`
    summary and <stage>.log. Called once every check has passed and the inputs have been read."""
    if setup is not None and not setup.world.is_main:
        return
    if run.previous:  # resuming: the same config and data as before, and the first part's environment kept
        _check_same_config(run, cfg)
        env = {**env, "earlier": _earlier_environments(run, env.get("data_fingerprint"))}
    if setup is not None:  # what `auto` became on this machine
        env = {**env, **_resolved_hardware_settings(cfg, setup)}
    if HydraConfig.initialized():  # (a stage called as a function, without the CLI, has no Hydra record)
        _write_hydra_files(run.path, cfg)
    run.begin(cfg, env, stage=cfg.stage, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if LogBuffer.current is not None:
        LogBuffer.current.write_to(run.path / f"{cfg.stage}.log")
    device = f"  device {setup.device}  precision {_name(setup.dtype)}" if setup else ""
    log.info(f"{cfg.stage}: run directory {run.path}{device}")


def _resolved_hardware_settings(cfg: DictConfig, setup: Setup) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "device": str(setup.device),
        "precision": _name(setup.dtype),
        "eval_precision": _name(setup.eval_dtype),
    }
    if "trainer" in cfg and "channels_last" in cfg.trainer:
        settings["channels_last"] = use_channels_last(cfg.trainer.channels_last, setup.device, setup.dtype)
    return settings


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _earlier_environments(run: RunDir, fingerprint: str | None) -> list[dict[str, Any]]:
    """env.json of the run's earlier part(s), after checking that it goes on with the same data."""
    try:
        before = read_json(run.path / ENV)
    except (OSError, ValueError):
        return []
    known = before.get("data_fingerprint")
    if fingerprint and known and fingerprint != known:
        raise KdError(
            f"the data differ from those {run.path} started with (data fingerprint {fingerprint}, "
            f"was {known}); a resumed run must see the same data: restore them, or start a new run"
        )
    earlier = before.pop("earlier", [])
    return [*earlier, before]


def _check_same_config(run: RunDir, cfg: DictConfig) -> None:
    """The config recomposed now must resolve to what the run started with, but for the accepted
    changes of this resume: else kd or a config file changed since, and the run would become a mix."""
    from kd_cli.engine.rundir import CONFIG
    from kd_cli.overrides import canonical, flatten
    from kd_cli.stages.claim import FREE_ON_RESUME, HOW_TO_RUN, read_saved

    before = flatten(read_saved(run.path / CONFIG) or {})
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    accepted = {
        change.split("=", 1)[0] for record in run.sticky.get("resumes", [])[-1:] for change in record["changes"]
    }

    def ignored(key: str) -> bool:
        free = any(key == p or key.startswith(p + ".") for p in FREE_ON_RESUME)
        return key.split(".")[0] in HOW_TO_RUN or key in accepted or free

    differ = [
        f"{key}: {before.get(key)} -> {now.get(key)}"
        for key in dict.fromkeys([*before, *now])
        if not ignored(key) and canonical(before.get(key)) != canonical(now.get(key))
    ]
    if differ:
        raise KdError(
            f"{run.path}: its config resolves differently today than when it started ({'; '.join(differ[:3])}"
            f"{'; ...' if len(differ) > 3 else ''}): kd or a config file changed since; resume it with the "
            f"version that started it, or start a new run"
        )


def _write_hydra_files(path: Path, cfg: DictConfig) -> None:
    """What Hydra writes to .hydra/ (told not to, since it would write before the run is claimed)."""
    hydra = cast(DictConfig, HydraConfig.instance().cfg)  # the whole config, its `hydra` node within (not a HydraConf)
    files = {"config.yaml": cfg, "hydra.yaml": hydra, "overrides.yaml": hydra.hydra.overrides.task}
    for name, node in files.items():
        atomic_write(path / ".hydra" / name, partial(OmegaConf.save, node))  # OmegaConf.save(node, tmp)


def print_config(cfg: DictConfig) -> None:
    """The resolved config as a tree (rich), at the start of a run."""
    from rich.console import Console
    from rich.tree import Tree

    def add(tree: Tree, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                add(tree.add(f"[bold]{key}[/]"), value)
            else:
                tree.add(f"{key}: [cyan]{value}[/]")

    tree = Tree(f"[bold]{cfg.stage}[/] config")
    add(tree, OmegaConf.to_container(cfg, resolve=True))
    Console().print(tree)


def saved_dataset(weights: Path) -> dict | None:
    """The dataset node of the config_resolved.yaml beside a saved model, or of the run that holds it
    as a peer (RUN/peers/NAME, online distillation); None when there is none. A broken file is a
    one-line error naming it."""
    from kd_cli.engine.rundir import CONFIG
    from kd_cli.stages.claim import read_saved

    folder = Path(weights).parent
    if not (folder / CONFIG).exists() and folder.parent.name == PEERS:
        folder = folder.parent.parent
    saved = read_saved(folder / CONFIG)
    node = saved.get("dataset") if isinstance(saved, dict) else None
    return node if isinstance(node, dict) else None


def dataset_options(cfg: DictConfig) -> dict:
    return cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True))


def options_with_defaults(model_cfg: DictConfig) -> dict:
    """Every option of the model, the builder's defaults filled in: `teacher=default` with `{}` and
    `teacher=cnn` with `{width: 32, ...}` describe the same network, and model.json says so."""
    from kd_cli.model_index import model_options as defaults
    from kd_cli.models import MODELS

    given = cast("dict[str, Any]", OmegaConf.to_container(model_cfg.kwargs, resolve=True))
    return {**defaults(MODELS.get(model_cfg.arch)), **given}


def model_spec(model_cfg: DictConfig, data, dataset_cfg: DictConfig) -> ModelSpec:
    return ModelSpec(
        arch=model_cfg.arch,
        kwargs=options_with_defaults(model_cfg),
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.input_size,
        mean=list(dataset_cfg.mean),
        std=list(dataset_cfg.std),
        class_names=list(data.class_names),
        dataset=dataset_cfg.name,
        # how an image file becomes this model's input (kd predict): the evaluation crop of image folders
        extra={"crop_fraction": dataset_cfg.crop_fraction} if "crop_fraction" in dataset_cfg else {},
    )


def eval_loader(
    cfg: DictConfig,
    split,
    spec: ModelSpec,
    device: torch.device,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
):
    """`split` in a fixed order without augmentation, normalised as `spec`'s model expects (scoring a saved
    model, calibrating int8, checking an import or an export)."""
    from kd_cli.data import make_loader

    return make_loader(
        split,
        batch_size=batch_size or cfg.trainer.eval_batch_size,
        train=False,
        spec=None,
        mean=spec.mean,
        std=spec.std,
        device=device,
        seed=cfg.seed,
        num_workers=cfg.trainer.num_workers if num_workers is None else num_workers,
    )


def count_parameters(model: nn.Module) -> int:
    """Weights and biases; int8 weights too (torch.ao packs those into buffers, not parameters)."""
    stored = [
        t
        for v in model.state_dict().values()
        for t in (v if isinstance(v, tuple) else (v,))
        if isinstance(t, torch.Tensor)
    ]
    if not any(t.is_quantized for t in stored):
        return sum(p.numel() for p in model.parameters())
    return sum(t.numel() for t in stored if t.is_quantized or isinstance(t, nn.Parameter))


def check_channels(mean: list, std: list, in_channels: int) -> None:
    if len(mean) != in_channels or len(std) != in_channels:
        raise KdError(
            f"dataset.mean/std have {len(mean)}/{len(std)} values but the images have {in_channels} channel(s)"
        )


def check_model_fits(
    spec: ModelSpec,
    data,
    path: Path,
    role: str,
    normalisation: tuple | None = None,
    same_size: bool = False,
    converted: bool = False,
) -> None:
    """Refuse a saved model whose outputs mean other classes than this data set's (count, names or
    order) or that takes other channels; a model that saw other image sizes is refused with
    `same_size`, else warned about, like one trained with another normalisation (`normalisation`:
    this run's (mean, std)). `converted`: the model gets the images in its own form (a teacher, see
    models/input_form.py), so another size or normalisation is only noted, and grey data may feed an
    RGB model."""
    from kd_cli.models.input_form import can_convert

    channels_fit = (
        can_convert(data.in_channels, spec.in_channels) if converted else spec.in_channels == data.in_channels
    )
    if spec.num_classes != data.num_classes or not channels_fit:
        raise KdError(
            f"{role} {path} was trained for {spec.num_classes} classes and {spec.in_channels} channel(s) "
            f"({spec.dataset}) but this data set has {data.num_classes} and {data.in_channels}; give a "
            f"{role} trained on it, or the data set it was trained on"
        )
    if list(spec.class_names) != list(data.class_names):
        odd = next(((a, b) for a, b in zip(spec.class_names, data.class_names) if a != b), ("?", "?"))
        raise KdError(
            f"{role} {path} was trained for other classes ({spec.dataset}: class '{odd[0]}' where this "
            f"data set has '{odd[1]}'); its outputs would be read as the wrong classes: give a {role} "
            f"trained on these classes, in this order, or the data set it was trained on"
        )
    if converted:
        return
    if spec.input_size != data.input_size:
        message = f"{role} {path} was trained on {spec.input_size}px images, this data set has {data.input_size}px"
        fix = (
            f"dataset.image_size={spec.input_size}"
            if "image_size" in dataset_options_of(spec)
            else "the data set it was trained on"
        )
        if same_size:
            raise KdError(f"{message}; pass {fix}")
        warn(f"{message}; pass {fix} to feed it as it was trained")
    if normalisation is not None and not (_close(spec.mean, normalisation[0]) and _close(spec.std, normalisation[1])):
        warn(
            f"{role} {path} was trained on images normalised with mean {spec.mean} / std {spec.std}, this run "
            f"normalises with {list(normalisation[0])} / {list(normalisation[1])}"
        )


def dataset_options_of(spec: ModelSpec) -> set[str]:
    """The options of the data set a saved model names (empty when it is not registered here)."""
    import inspect

    from kd_cli.data import DATASETS

    try:
        return set(inspect.signature(DATASETS.get(spec.dataset)).parameters)
    except KdError:
        return set()


def check_pretrained_form(model: nn.Module, dataset_cfg: DictConfig, role: str) -> None:
    """Pretrained weights expect their own normalisation (timm's resolve_data_config): a run that
    normalises otherwise starts them on inputs they never saw, so say which values to set."""
    form = getattr(model, "kd_pretrained_form", None)
    if not form:
        return
    mean, std = list(dataset_cfg.mean), list(dataset_cfg.std)
    channels = len(mean)
    expected_mean, expected_std = form["mean"][:channels], form["std"][:channels]
    if not (_close(mean, expected_mean) and _close(std, expected_std)):
        shown = lambda values: "[" + ",".join(f"{v:.4g}" for v in values) + "]"  # noqa: E731
        warn(
            f"the {role}'s pretrained weights expect images normalised with mean {shown(expected_mean)} / std "
            f"{shown(expected_std)} (timm's data config) and this run uses {shown(mean)} / {shown(std)}: set "
            f"dataset.mean={shown(expected_mean)} dataset.std={shown(expected_std)} unless that is intended"
        )


def _close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
