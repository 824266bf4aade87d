"""Structured config schemas (types for every stage) and the teacher/student model options.

The YAML files under configs/ hold every default value; the dataclasses here hold only types, so
Hydra rejects a wrong type or an unknown key before anything runs and no default lives in two
places. Data-set and method nodes are open dicts: their keys are checked against the signature
of the registered loader or method instead (see kd_cli/registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    outputs: str = MISSING
    data: str = MISSING


@dataclass
class ModelConfig:
    arch: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)
    # teacher only: a run directory, a model.safetensors file, `auto` (newest matching teacher run
    # under paths.outputs, trained first when there is none) or null (train-teacher).
    checkpoint: str | None = None


@dataclass
class AugmentationConfig:
    name: str = MISSING
    crop_padding: int = MISSING
    hflip: bool = MISSING
    rotate_degrees: float = MISSING
    erase_prob: float = MISSING
    trivial_augment: bool = MISSING


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    momentum: float = MISSING
    nesterov: bool = MISSING
    betas: list[float] = MISSING
    schedule: str = MISSING
    milestones: list[int] = MISSING
    gamma: float = MISSING
    warmup_epochs: float = MISSING
    min_lr: float = MISSING
    backbone_lr_scale: float = MISSING
    fused: Any = MISSING  # auto | true | false (checked in engine/values.py)


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    device: str = MISSING
    precision: str = MISSING
    channels_last: Any = MISSING  # true | false | auto (checked in stages/checks.py)
    compile: Any = MISSING  # false | true | a torch.compile mode (checked in stages/checks.py)
    deterministic: bool = MISSING
    num_workers: int = MISSING
    eval_every: int = MISSING
    grad_clip: float | None = MISSING
    progress: str = MISSING
    max_steps_per_epoch: int | None = MISSING


@dataclass
class CsvLoggerConfig:
    """metrics.csv is written in every run; `logger=csv` alone means no external tracker."""


@dataclass
class TensorBoardLoggerConfig:
    dir: str = MISSING


@dataclass
class MlflowLoggerConfig:
    tracking_uri: str = MISSING
    experiment: str = MISSING
    artifact_location: str | None = MISSING


@dataclass
class WandbLoggerConfig:
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    mode: str = MISSING
    dir: str = MISSING


@dataclass
class LoggerConfig:
    """One key per selected tracker: `logger=mlflow` fills `mlflow`, `logger=[tensorboard,mlflow]` both."""

    csv: CsvLoggerConfig | None = None
    tensorboard: TensorBoardLoggerConfig | None = None
    mlflow: MlflowLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None


@dataclass
class BaseConfig:
    stage: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = MISSING
    dataset: Any = MISSING
    trainer: TrainerConfig = MISSING


@dataclass
class TrainConfig(BaseConfig):
    augmentation: AugmentationConfig = MISSING
    method: Any = MISSING
    optim: OptimConfig = MISSING
    logger: LoggerConfig = MISSING
    resume: str | None = None  # a run directory (or a sweep folder) to continue
    resume_extend: bool = False  # let resume= train the run longer (trainer.epochs, trainer.eval_every)


@dataclass
class TrainTeacherConfig(TrainConfig):
    teacher: ModelConfig = MISSING
    # Ignored: lets one experiment preset (teacher + student) serve train-teacher and distill alike.
    student: ModelConfig | None = None


@dataclass
class TeacherCacheConfig:
    enabled: bool = MISSING
    dir: str = MISSING
    max_gb: float = MISSING


@dataclass
class DistillConfig(TrainConfig):
    teacher: ModelConfig = MISSING
    student: ModelConfig = MISSING
    teacher_cache: TeacherCacheConfig = MISSING


@dataclass
class EvaluateConfig(BaseConfig):
    run: str = MISSING
    split: str = MISSING
    teacher_run: str | None = None
    latency_batches: int = MISSING
    latency_batch_size: int = MISSING


@dataclass
class ImportConfig(BaseConfig):
    source: str = MISSING
    nested: str | None = None
    model: ModelConfig = MISSING


@dataclass
class CompressConfig(TrainConfig):
    run: str = MISSING
    dataset: Any = None  # the model's own data set unless given
    compression: Any = MISSING  # open: each step's options are checked against its class (kd_cli/compress)
    latency_batches: int = MISSING
    latency_batch_sizes: list[int] = MISSING


@dataclass
class ExportConfig:
    stage: str = MISSING
    seed: int = MISSING
    paths: PathsConfig = MISSING
    run: str = MISSING
    format: str = MISSING
    opset: int = MISSING
    dynamic_batch: bool = MISSING
    check_batch_size: int = MISSING
    check_inputs: str = MISSING
    tolerance: float = MISSING
    box_tolerance: float = MISSING


def register_configs() -> None:
    """Schemas, plus one `teacher=NAME` / `student=NAME` option per registered model."""
    from kd_cli.model_index import model_index

    _share_config_store_in_copies()
    cs = ConfigStore.instance()
    cs.store(name="train_teacher_schema", node=TrainTeacherConfig)
    cs.store(name="distill_schema", node=DistillConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="compress_schema", node=CompressConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="import_schema", node=ImportConfig)
    for name, options in model_index().items():
        cs.store(group="teacher", name=name, node={"arch": name, "kwargs": options, "checkpoint": "auto"})
        cs.store(group="student", name=name, node={"arch": name, "kwargs": options})


def _share_config_store_in_copies() -> None:
    """Hydra deep-copies its config repository for every group it lists, and with it the process-wide
    ConfigStore (~80 nodes here): `kd STAGE --help` lists ~160 groups, 8 s of copying. The store is a
    singleton that loading never mutates (it hands out copies of its nodes), so a copy may be itself."""
    ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]
