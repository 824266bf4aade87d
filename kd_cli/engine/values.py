"""The training settings' names and ranges, checked without importing torch (so that a wrong value
is answered in a fraction of a second, before the models and data are loaded)."""

from __future__ import annotations

from typing import Any

from kd_cli.engine.optimizers import OPTIMIZERS
from kd_cli.errors import KdError
from kd_cli.registry import Range, check_number

SCHEDULES = ("cosine", "multistep", "poly", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# trainer.compile: false, true (torch.compile's default mode) or one of its modes; reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(setting: Any) -> str | None:
    """torch.compile's mode for `trainer.compile`, or None for no compilation."""
    value = str(setting).lower()
    if value in ("false", "none"):
        return None
    if value == "true":
        return "default"
    if value in COMPILE_MODES:
        return value
    raise KdError(f"trainer.compile={setting} is not one of false, true, {', '.join(COMPILE_MODES)}")


def check_optim(cfg: Any, epochs: int) -> None:
    """Every optimiser and schedule value, before anything is built (NaN and inf included)."""
    OPTIMIZERS.get(cfg.name)  # an unknown name: one line listing the registered ones
    if cfg.schedule not in SCHEDULES:
        raise KdError(f"unknown optim.schedule '{cfg.schedule}' (choose from: {', '.join(SCHEDULES)})")
    if str(cfg.fused).lower() not in ("auto", "true", "false"):
        raise KdError(f"optim.fused={cfg.fused} is not one of auto, true, false")
    check_number("optim.lr", cfg.lr, Range(0, low_open=True))
    check_number("optim.weight_decay", cfg.weight_decay, Range(0))
    check_number("optim.momentum", cfg.momentum, Range(0, 1, high_open=True))
    if len(cfg.betas) != 2:
        raise KdError(f"optim.betas={list(cfg.betas)} must be two numbers (Adam's decay rates), e.g. [0.9,0.999]")
    for beta in cfg.betas:
        check_number("optim.betas", beta, Range(0, 1, high_open=True), hint="each of the two")
    check_number("optim.gamma", cfg.gamma, Range(0, low_open=True))
    check_number(
        "optim.backbone_lr_scale",
        cfg.backbone_lr_scale,
        Range(0, 1, low_open=True),
        hint="the fraction of optim.lr the pretrained layers get",
    )
    check_number("optim.min_lr", cfg.min_lr, Range(0, cfg.lr), hint="at most optim.lr")
    for milestone in cfg.milestones:
        check_number("optim.milestones", milestone, Range(0), hint="epochs at which the rate drops")
    check_number("optim.warmup_epochs", cfg.warmup_epochs, Range(0, epochs), hint=f"trainer.epochs={epochs}")
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum == 0:
        raise KdError("optim.nesterov=true needs optim.momentum > 0 (Nesterov's step is a momentum correction)")
    _check_used(cfg)


def _check_used(cfg: Any) -> None:
    """An optimiser option set away from its file's value that the optimiser does not take (momentum for
    AdamW, betas for SGD) would be ignored: refused, as every other ignored option is."""
    import inspect
    from importlib.resources import files

    import yaml

    takes = set(inspect.signature(OPTIMIZERS.get(cfg.name)).parameters)
    own = files("kd_cli.configs") / "optim" / f"{cfg.name}.yaml"
    defaults = yaml.safe_load(own.read_text()) if own.is_file() else {}
    for key in ("momentum", "nesterov", "betas"):
        if key in cfg and key not in takes and key in defaults and _plain(cfg[key]) != defaults[key]:
            raise KdError(f"optim.{key}={_plain(cfg[key])} does nothing with optim={cfg.name}, which does not take it")


def _plain(value: Any) -> Any:
    return list(value) if not isinstance(value, (str, bytes, int, float, bool)) and value is not None else value
