"""Every timm model by name, as teacher or student: `teacher.arch=timm/convnext_tiny`.

timm (an optional extra: pip install 'kd-cli[timm]') builds the network with its own `create_model`
for the data set's classes and channels. Weights, when asked for:
- `pretrained=true`: timm's pretrained weights from the local Hugging Face / torch hub cache (or the
  network, where there is one); a name may carry timm's weight tag (`timm/resnet50.a1_in1k`). timm
  replaces the classifier when the classes differ and adapts the first conv to the channels.
- `weights=PATH`: a local file (safetensors, or a state dict read with weights_only=True, also nested
  or prefixed by a wrapper: see models/foreign_weights.py). The classifier is kept when it fits the
  classes and replaced when it does not; a first conv for other channels is adapted as timm does.
The stage outputs for feature methods are timm's `feature_info` modules (stride 4 and deeper); the
embedding is the classifier's input (`features.tap_classifier_input`: the state dict keeps timm's keys).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Callable

from torch import nn

from kd_cli.errors import KdError
from kd_cli.models.blocks import DropoutRate, check_io
from kd_cli.models.features import set_feature_layers, tap_classifier_input
from kd_cli.models.foreign_weights import brief_error as _brief
from kd_cli.models.hub import HUB_HOST, hub_offline, hub_quiet, reachable
from kd_cli.models.registry import MODELS

log = logging.getLogger("kd")
PREFIX = "timm/"
INSTALL = "pip install 'kd-cli[timm]'"


def import_timm():
    try:
        import timm
    except ImportError:
        raise KdError(f"timm models need the timm package: {INSTALL}") from None
    return timm


def resolve(name: str) -> Callable[..., nn.Module]:
    """The builder for timm model `name` (an architecture, optionally with a `.tag` of its weights)."""
    timm = import_timm()
    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        names = timm.list_models()
        close = difflib.get_close_matches(architecture, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KdError(f"unknown timm model '{name}'{hint} (timm.list_models() lists its {len(names):,} names)")
    return _builder(name)


@functools.cache
def _builder(name: str) -> Callable[..., nn.Module]:
    def build(
        num_classes: int,
        in_channels: int,
        input_size: int,
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: DropoutRate = 0.0,
        drop_path_rate: DropoutRate = 0.0,
    ) -> nn.Module:
        return build_timm(name, num_classes, in_channels, input_size, pretrained, weights, drop_rate, drop_path_rate)

    build.__name__ = build.__qualname__ = PREFIX + name
    build.__doc__ = f"timm {name}; pretrained=true: timm's weights from the cache; weights=PATH: a local file."
    # (the ignores: mypy knows no attributes of a function beyond its own)
    build.__signature__ = inspect.signature(build)  # type: ignore[attr-defined]
    build.validate_options = _validate  # type: ignore[attr-defined]
    return build


def _validate(pretrained: bool = False, weights: str | None = None, **_: object) -> None:
    if pretrained and weights:
        raise KdError("give pretrained=true or weights=PATH, not both (weights=PATH is the local file to load)")


def build_timm(
    name: str,
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool,
    weights: str | None,
    drop_rate: float,
    drop_path_rate: float,
) -> nn.Module:
    timm = import_timm()
    check_io(PREFIX + name, num_classes, in_channels, input_size)
    options = dict(num_classes=num_classes, in_chans=in_channels, drop_rate=drop_rate)
    if drop_path_rate:
        options["drop_path_rate"] = drop_path_rate
    if _takes_img_size(timm, name):  # ViTs and the like fix their patch grid to the input size
        options["img_size"] = input_size
    model = _create(timm, name, pretrained, options)
    if weights:
        load_weights(model, weights, in_channels, PREFIX + name)
    if pretrained or weights:  # what the weights were trained on, for a warning when the data differ
        model.kd_pretrained_form = pretrained_form(timm, model)  # type: ignore[assignment]  # stubs: tensors, modules
    return add_feature_layers(model)


def pretrained_form(timm, model: nn.Module) -> dict:
    """timm's `resolve_data_config` for the model's pretrained config: the size and statistics its
    weights expect."""
    config = timm.data.resolve_data_config({}, model=model)
    return {
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "input_size": int(config["input_size"][-1]),
    }


def _takes_img_size(timm, name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name.split(".", 1)[0]) if hasattr(timm.models, "get_pretrained_cfg") else None
    return bool(cfg and cfg.fixed_input_size)


def _create(timm, name: str, pretrained: bool, options: dict) -> nn.Module:
    if not pretrained:
        try:
            return timm.create_model(name, **options)
        except (RuntimeError, ValueError, TypeError) as error:
            raise KdError(f"timm cannot build {name} with {options} ({_brief(error)})") from None
    try:  # the local cache first: no network call, no retries
        with hub_offline():
            return timm.create_model(name, pretrained=True, **options)
    except Exception:  # noqa: BLE001 - the hub raises many kinds for "not in the cache"
        if not reachable(HUB_HOST):
            raise KdError(
                f"no pretrained weights for timm/{name} in the local cache and no network to fetch them: "
                f'on a machine with internet run python -c "import timm; '
                f"timm.create_model('{name}', pretrained=True)\" and copy ~/.cache/huggingface here, or pass "
                f"weights=PATH to a local file"
            ) from None
    try:
        with hub_quiet():
            return timm.create_model(name, pretrained=True, **options)
    except Exception as error:  # noqa: BLE001
        raise KdError(
            f"could not download the pretrained weights of timm/{name} ({_brief(error)}); pass "
            "weights=PATH to a local file, or retry"
        ) from None


def load_weights(model: nn.Module, path: str, in_channels: int, what: str) -> None:
    """A local weights file into `model`: the classifier replaced when its classes differ, a first conv
    for 3 channels adapted to `in_channels` (timm's adapt_input_conv)."""
    from kd_cli.models.foreign_weights import fit_state, read_state_dict, strip_wrappers

    state = strip_wrappers(read_state_dict(path), set(model.state_dict()))
    first_conv = (getattr(model, "pretrained_cfg", {}) or {}).get("first_conv")
    key = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    if key and key in state and state[key].shape[1] != in_channels:
        from timm.models import adapt_input_conv

        state[key] = adapt_input_conv(in_channels, state[key])
    fresh = fit_state(model, state, f"{what} weights={path}", replaceable=(classifier_name(model),))
    if fresh:
        log.info(f"{what}: weights from {path}; new classifier ({len(fresh)} tensors) for this data set's classes")


def _get_classifier(model: nn.Module) -> nn.Module | None:
    """timm's `get_classifier()`, None for a model without one."""
    getter = getattr(model, "get_classifier", None)
    return getter() if getter is not None else None


def classifier_name(model: nn.Module) -> str:
    classifier = _get_classifier(model)
    for name, module in model.named_modules():
        if module is classifier:
            return name
    return "__none__"


def add_feature_layers(model: nn.Module) -> nn.Module:
    classifier = _get_classifier(model)
    tap_classifier_input(model, classifier)
    info = getattr(model, "feature_info", None)
    stages = []
    if info is not None:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        stages = [entry["module"] for entry in entries if entry.get("reduction", 4) >= 4 and entry.get("module")]
    modules = dict(model.named_modules())
    stages = [name for name in stages if name in modules][-4:]
    return set_feature_layers(model, stages, "kd_embedding")


MODELS.family(PREFIX, resolve)
