"""What a stage reads of its data: the data set and its loaders (training, test, validation), the data
set of a saved run, an evaluation loader in a model's own normalisation, and what env.json says of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from kd_cli.data import Augmentation, DataSplits, load_dataset, make_loader
from kd_cli.engine.artifacts import ModelSpec
from kd_cli.engine.trackers import check_trackers
from kd_cli.errors import KdError
from kd_cli.stages.models import check_channels
from kd_cli.stages.setup import Setup

log = logging.getLogger("kd")


@dataclass
class Loaders:
    data: DataSplits
    train: Any
    test: Any
    val: Any = None  # when the data set has a validation split: it chooses the best epoch


def load_data(cfg: DictConfig, setup: Setup) -> Loaders:
    """The data set and its loaders (reads only: the run directory is not written yet)."""
    check_trackers(cfg.get("logger"))  # a missing tracker extra fails here, before data, teacher or training
    data = load_dataset(dataset_options(cfg))
    check_channels(list(cfg.dataset.mean), list(cfg.dataset.std), data.in_channels)
    options = cast("dict[str, Any]", OmegaConf.to_container(cfg.augmentation, resolve=True))
    augmentation = {k: v for k, v in options.items() if k != "name"}
    common = dict(
        mean=list(cfg.dataset.mean),
        std=list(cfg.dataset.std),
        device=setup.device,
        seed=stream_seed(cfg),
        rank=setup.world.rank,
        world_size=setup.world.size,
        num_workers=cfg.trainer.num_workers,
    )
    train = make_loader(
        data.train,
        batch_size=cfg.trainer.batch_size,
        train=True,
        spec=Augmentation(**augmentation),
        drop_last=True,
        **common,
    )
    test = make_loader(
        data.test,
        batch_size=cfg.trainer.eval_batch_size,
        train=False,
        spec=None,
        **{**common, "rank": 0, "world_size": 1},
    )
    val = (
        None
        if data.val is None
        else make_loader(
            data.val,
            batch_size=cfg.trainer.eval_batch_size,
            train=False,
            spec=None,
            **{**common, "rank": 0, "world_size": 1},
        )
    )
    if len(train) == 0:  # (checked here, before the run starts, rather than when the loop begins)
        raise KdError(
            f"the training split has {train.num_samples} sample(s) per process, fewer than one batch "
            f"(trainer.batch_size={cfg.trainer.batch_size}); lower trainer.batch_size"
        )
    held_out = f" / {len(data.val)} val" if data.val is not None else ""
    log.info(
        f"data: {cfg.dataset.name}  {len(data.train)} train{held_out} / {len(data.test)} test  "
        f"{data.num_classes} classes  {data.in_channels}x{data.input_size}x{data.input_size}"
    )
    return Loaders(data, train, test, val)


def stream_seed(cfg: DictConfig) -> int:
    """The seed of the training batches (their order and augmentation): `dataset.aug_seed`, else `seed`.
    Runs that differ in `seed` alone then differ in the student's initialisation only, and share the
    teacher's outputs through the teacher cache."""
    aug_seed = cfg.dataset.get("aug_seed")
    return int(cfg.seed if aug_seed is None else aug_seed)


def data_env(cfg: DictConfig, setup: Setup, loaders: Loaders) -> dict[str, Any]:
    """What env.json says about the device and the data of a training run."""
    data = loaders.data
    return dict(
        device=str(setup.device),
        seed=cfg.seed,
        world_size=setup.world.size,
        data_fingerprint=data.fingerprint,
        train_samples=len(data.train),
        test_samples=len(data.test),
        val_samples=len(data.val) if data.val is not None else 0,
    )


def saved_dataset(weights: Path) -> dict | None:
    """The dataset node of the config_resolved.yaml beside a saved model, or of the run that holds it
    as a peer (RUN/peers/NAME, online distillation); None when there is none. A broken file is a
    one-line error naming it."""
    from kd_cli.engine.rundir import CONFIG, PEERS
    from kd_cli.stages.claim import read_saved

    folder = Path(weights).parent
    if not (folder / CONFIG).exists() and folder.parent.name == PEERS:
        folder = folder.parent.parent
    saved = read_saved(folder / CONFIG)
    node = saved.get("dataset") if isinstance(saved, dict) else None
    return node if isinstance(node, dict) else None


def dataset_options(cfg: DictConfig) -> dict:
    return cast("dict[str, Any]", OmegaConf.to_container(cfg.dataset, resolve=True))


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
