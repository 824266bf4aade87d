"""Distillation methods: one file each, registered by name; `method=NAME` picks one.

To add a method: write `kd_cli/methods/mine.py` with a `@register_method("mine")` Distiller
subclass whose keyword arguments are its options, and `configs/method/mine.yaml` with `name: mine`
and a value for each option. Every module in this package is imported automatically.

The options' annotations are their schema (`kd_weight: NonNegative`, `temperature: Positive`,
`order: NonNegativeInt`, `Literal[...]`, see kd_cli/registry.py), and `validate_options` holds the
rules that tie options together; `check_method_options` applies both before any data is read or any
teacher trained, `build_method` again when it builds. `__init__` checks only what needs the models or
the data (layer names, feature shapes, the training split's size).

Every method names the options that weight its loss terms in `loss_weights`; `Distiller.validate_options`
refuses a config in which all of them are 0 (nothing would be learned), and `forward` leaves out a
term whose weight is 0 (no column of zeros in metrics.csv, no time spent on it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods.base import Distiller
from kd_cli.registry import Registry, entry_parameters, import_submodules
from kd_cli.tasks import get_task

# the registered name is kept as `method_name`, for messages (`method=kd: ...`), also in a subclass's rules
METHODS = Registry("method", name_attribute="method_name")
register_method = METHODS.register


FIXED = ("student", "teacher", "num_samples", "new_student", "load_model")  # given by the stage, not options
PATH = "method"  # where the options sit in the config


def check_method_options(cfg: Mapping[str, Any]) -> None:
    """The method config (`name` + options) by name, type and range, plus its `validate_options`,
    without building anything: messages name the key as typed (`method.temperature=0 must be ...`).
    An OmegaConf node is taken as its plain container (a ListConfig is not a list to the type checks)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))  # a DictConfig gives a dict
    if not cfg.get("name"):
        raise KdError(f"the method config has no name; pick a method with method=NAME ({', '.join(METHODS.names())})")
    METHODS.check(cfg["name"], _options(cfg), fixed=FIXED, path=PATH)


def build_method(
    cfg: Mapping[str, Any],
    student: nn.Module,
    teacher: nn.Module | None,
    num_samples: int | None = None,
    new_student: Callable[[], nn.Module] | None = None,
    load_model: Callable[[str], tuple[nn.Module, Any]] | None = None,
    task: str = "classification",
) -> Distiller:
    """`num_samples` (the training split's size) is passed to methods that take it (CRD's memory),
    `new_student` (a fresh, newly initialised network of the student's architecture) to those that
    train several students (DML's cohort, ONE's branches), and `load_model` (a saved model's path ->
    (network, spec), the stage's artifact loader) to those that load their own teachers (ensemble)."""
    check_method_task(cfg["name"], task)
    fixed: dict[str, Any] = {"student": student, "teacher": teacher}
    parameters, _ = entry_parameters(METHODS.get(cfg["name"]))
    if "num_samples" in parameters:
        fixed["num_samples"] = num_samples
    if "new_student" in parameters:
        if new_student is None:
            raise KdError(
                f"method={cfg['name']} trains several students at once; kd compress fine-tunes one model: "
                f"use it in kd distill or kd train-teacher"
            )
        fixed["new_student"] = new_student
    if "load_model" in parameters:
        if load_model is None:
            raise KdError(f"method={cfg['name']} loads its own teachers; the stage must give it a model loader")
        fixed["load_model"] = load_model
    method = cast("Distiller", METHODS.build(cfg["name"], fixed, _options(cfg), path=PATH))
    method.__dict__["task"] = get_task(task)  # a plain attribute (Distiller.__init__ declares it)
    return method


def method_tasks(name: str) -> tuple[str, ...]:
    return cast("type[Distiller]", METHODS.get(name)).tasks


def check_method_task(name: str, task: str) -> None:
    """A method written for another task than the data set's: one line naming those that apply."""
    if task not in method_tasks(name):
        fitting = [other for other in METHODS.names() if task in method_tasks(other)]
        raise KdError(
            f"method={name} distils {' and '.join(method_tasks(name))} models, but this data set is {task}; "
            f"the methods for {task} are: {', '.join(fitting)}"
        )


def _options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "name"}


def method_requires_teacher(name: str) -> bool:
    return cast("type[Distiller]", METHODS.get(name)).requires_teacher  # every entry is a Distiller subclass


import_submodules(__name__, __path__)

__all__ = [
    "METHODS",
    "Distiller",
    "build_method",
    "check_method_options",
    "check_method_task",
    "method_requires_teacher",
    "method_tasks",
    "register_method",
]
