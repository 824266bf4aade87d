"""Every value of a stage's config, checked before any data is read or anything is trained or written.

Hydra's schemas (config.py) already hold the types of the fixed nodes; these are the ranges and the
open nodes (data set, models, method: checked against their registered signatures). A later check
that needs the data (a model's input size, a method's feature shapes) runs as a dry build before the
run starts (see the stages).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kd_cli.engine.values import PRECISIONS, check_optim, compile_mode
from kd_cli.errors import KdError
from kd_cli.registry import MAX_COUNT, Range, check_number

PROGRESS = ("auto", "bar", "plain", "none")


def check_config(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Every value checked (raising one line for the first wrong one). With the command line's `overrides`,
    also the one default that depends on the data set: the task's own method (`use_the_tasks_method`)."""
    check_plain_values(cfg)
    if cfg.get("dataset") is not None:  # (first: the augmentation's defaults are interpolated from it)
        from kd_cli.data import check_dataset_config

        check_dataset_config(_plain(cfg.dataset))
    if "augmentation" in cfg:
        check_augmentation(_plain(cfg.augmentation))
    for role in ("teacher", "student", "model"):
        if cfg.get(role) is not None and "arch" in cfg[role]:
            check_model(cfg[role], role)
    if overrides is not None:
        use_the_tasks_method(cfg, overrides)
    if "method" in cfg:
        from kd_cli.methods import check_method_options

        check_method_options(cfg.method)
    if cfg.get("dataset") is not None:
        check_task_fit(cfg)


def use_the_tasks_method(cfg: DictConfig, overrides: list[str]) -> None:
    """The method group's default (`kd`) distils classifiers; on another task's data set, unless the command
    line (`overrides`) chooses a method, the stage uses that task's logit method instead (pixel_kd for
    segmentation), said in one line. What runs is what config_resolved.yaml then records."""
    import logging
    from importlib.resources import files

    import yaml

    from kd_cli.data import dataset_task
    from kd_cli.methods import METHODS, method_tasks
    from kd_cli.tasks import get_task

    if cfg.get("dataset") is None or "method" not in cfg or str(cfg.method.name) not in METHODS:
        return
    task = get_task(dataset_task(cfg.dataset.name))
    chosen = any(o.lstrip("+~").split("=")[0].split(".")[0] == "method" for o in overrides)
    if chosen or task.name in method_tasks(str(cfg.method.name)):
        return
    options = yaml.safe_load((files("kd_cli.configs") / "method" / f"{task.logit_method}.yaml").read_text())
    logging.getLogger("kd").info(
        f"method={task.logit_method}: the {task.name} counterpart of the default method={cfg.method.name}"
    )
    with open_dict(cfg):
        cfg.method = OmegaConf.create(options)


def check_task_fit(cfg: DictConfig) -> None:
    """The models and the method serve the data set's task (a segmentation data set takes segmentation
    models and methods): one line naming those that do, before any data is read."""
    from kd_cli.data import dataset_task
    from kd_cli.data.base import DATASETS
    from kd_cli.methods import check_method_task
    from kd_cli.models import list_models, model_task

    task = dataset_task(cfg.dataset.name)
    for role in ("teacher", "student", "model"):
        node = cfg.get(role)
        if node is None or "arch" not in node or model_task(str(node.arch)) == task:
            continue
        fitting = [name for name in list_models() if model_task(name) == task]
        its_task = model_task(str(node.arch))
        its_data = [name for name in DATASETS.names() if dataset_task(name) == its_task]
        raise KdError(
            f"{role}.arch={node.arch} is a {its_task} model, but dataset={cfg.dataset.name} is {task}; choose one "
            f"of: {', '.join(fitting)}; or a {its_task} data set ({', '.join(its_data[:6])})"
        )
    if "method" in cfg:
        check_method_task(str(cfg.method.name), task)
    if task == "detection":
        require_coco_scoring()


def require_coco_scoring() -> None:
    """Detection is scored by pycocotools' COCOeval (an optional extra): missing, it is one line before any
    work, not an ImportError after the first epoch."""
    import importlib.util

    if importlib.util.find_spec("pycocotools") is None:
        raise KdError(
            "detection is scored by pycocotools' COCOeval, which is not installed: pip install 'kd-cli[coco]'"
        )


def check_plain_values(cfg: DictConfig) -> None:
    """The values that need no registry of models, data sets or methods (so no torch): the schema's
    keys, seed, paths, the stage's own values, trainer and optimiser."""
    check_known_keys(cfg)
    check_number("seed", cfg.seed, Range(0, 2**63 - 1))
    for key in ("outputs", "data"):
        if not str(cfg.paths[key]).strip():
            raise KdError(f"paths.{key} is empty; give a folder, e.g. paths.{key}={key}")
    check_stage_options(cfg)
    if "trainer" in cfg:
        check_trainer(cfg.trainer)
    if "optim" in cfg and "method" in cfg:
        check_optim(cfg.optim, cfg.trainer.epochs)
    if cfg.get("teacher_cache") is not None:
        check_number(
            "teacher_cache.max_gb",
            cfg.teacher_cache.max_gb,
            Range(0, 2**30, low_open=True),  # (an exabyte: a bound in bytes that an int still holds)
            hint="the cache's size bound in GiB",
        )
        if not str(cfg.teacher_cache.dir).strip():
            raise KdError("teacher_cache.dir is empty; give a folder, or teacher_cache.enabled=false")


def check_known_keys(node: DictConfig, prefix: str = "") -> None:
    """`+key=` and `++key=` add keys Hydra's schema does not know: refuse them like a typo. Open nodes
    (data set, method, model options, compression) are checked against their registered signatures."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        key = str(key)  # a field name (OmegaConf's stubs allow other key types: bytes, ints, enums)
        if key not in fields:
            raise KdError(f"unknown option {prefix}{key} (choose from: {', '.join(fields)}); it would be ignored")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_known_keys(child, f"{prefix}{key}.")


def check_stage_options(cfg: DictConfig) -> None:
    """The stage's own top-level values: latency runs, which model may carry a checkpoint."""
    if "latency_batches" in cfg:
        check_number("latency_batches", cfg.latency_batches, Range(1, 100_000))
    if "latency_batch_size" in cfg:
        check_number("latency_batch_size", cfg.latency_batch_size, Range(1, 2**16))
    if "latency_batch_sizes" in cfg:
        if not cfg.latency_batch_sizes:
            raise KdError("latency_batch_sizes is empty; give the batch sizes to time, e.g. latency_batch_sizes=[1,64]")
        for size in cfg.latency_batch_sizes:
            check_number("latency_batch_sizes", size, Range(1, 2**16), hint="each batch size")
    student = cfg.get("student")
    if student is not None and student.get("checkpoint") is not None:
        raise KdError(
            f"student.checkpoint={student.checkpoint} is not used: the student is trained from scratch "
            f"(remove it; teacher.checkpoint names the teacher)"
        )
    teacher = cfg.get("teacher")
    if cfg.stage == "train-teacher" and teacher is not None and teacher.get("checkpoint") not in (None, "auto"):
        raise KdError(
            f"train-teacher trains its teacher from scratch, so teacher.checkpoint={teacher.checkpoint} "
            f"would be ignored; remove it (it names the teacher of kd distill)"
        )


# Upper bounds of the trainer's counts: beyond them a value is a typo (or a machine kd was not built for),
# refused before anything is loaded instead of running out of memory, processes or time.
TRAINER_COUNTS = {
    "epochs": Range(1, 1_000_000),
    "batch_size": Range(1, 2**20),
    "eval_batch_size": Range(1, 2**20),
    "eval_every": Range(1, 1_000_000),
    "num_workers": Range(0, 256),
}


def check_trainer(trainer: DictConfig) -> None:
    for key, limit in TRAINER_COUNTS.items():
        check_number(f"trainer.{key}", trainer[key], limit)
    if trainer.max_steps_per_epoch is not None:
        check_number("trainer.max_steps_per_epoch", trainer.max_steps_per_epoch, Range(1, MAX_COUNT))
    if trainer.grad_clip is not None:
        check_number(
            "trainer.grad_clip",
            trainer.grad_clip,
            Range(0, low_open=True),
            hint="the largest gradient norm, or null for no clipping",
        )
    if trainer.progress not in PROGRESS:
        raise KdError(f"trainer.progress={trainer.progress} is not one of {', '.join(PROGRESS)}")
    if str(trainer.channels_last).lower() not in ("auto", "true", "false"):
        raise KdError(f"trainer.channels_last={trainer.channels_last} is not one of auto, true, false")
    compile_mode(trainer.compile)
    if str(trainer.precision).lower() not in PRECISIONS:
        raise KdError(f"trainer.precision={trainer.precision} is not one of {', '.join(PRECISIONS)}")


def check_augmentation(options: dict[str, Any]) -> None:
    from kd_cli.data import Augmentation

    options = {k: v for k, v in options.items() if k != "name"}
    check_number("augmentation.crop_padding", options.get("crop_padding", 0), Range(0))
    check_number("augmentation.rotate_degrees", options.get("rotate_degrees", 0.0), Range(0, 180))
    check_number("augmentation.erase_prob", options.get("erase_prob", 0.0), Range(0, 1))
    Augmentation(**options)


def check_model(model_cfg: DictConfig, role: str) -> None:
    from kd_cli.models import check_model_options

    check_model_options(model_cfg.arch, model_cfg.kwargs, path=f"{role}.kwargs")
    checkpoint = model_cfg.get("checkpoint")
    if role == "teacher" and checkpoint not in (None, "", "auto"):
        from kd_cli.engine.artifacts import load_spec, resolve_weights

        load_spec(resolve_weights(Path(str(checkpoint))))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
