"""Every option of every model, method and compression step is checked by name, type and range
before anything is built: the signatures' annotations are the schema (kd_cli/registry.py).

Parametrized over the registries, so a newly registered model, method or step is covered here
without a new test: its shipped YAML must pass, its options must be annotated, and each numeric
option must refuse a string and a value just outside its range with a message naming the key.
In-process and build-free: nothing here reads data, and the only models are the tiny ones against
which the compression steps' `check` tests the options that name layers (end of the file).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import torch
from kdrun import assert_one_line_error, kd_here
from omegaconf import OmegaConf

from kd_cli.compress import STEPS, build_step, check_steps
from kd_cli.errors import KdError
from kd_cli.methods import FIXED as METHOD_FIXED
from kd_cli.methods import METHODS, check_method_options
from kd_cli.methods.base import Distiller, FeatureDistiller
from kd_cli.model_index import model_options
from kd_cli.models import MODELS, check_model_options, create_model
from kd_cli.models.registry import FIXED as MODEL_FIXED
from kd_cli.registry import Range, entry_parameters, option_hints

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Options the shipped YAML cannot hold a value for: the user must give them.
USER_GIVEN = {"ensemble": {"teachers": ["runs/a", "runs/b"]}}


# ---------------------------------------------------------------- the options of each entry


def method_yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / f"{name}.yaml"), resolve=True)


def method_config(name: str) -> dict:
    return {**method_yaml(name), **USER_GIVEN.get(name, {})}


def compression(preset: str) -> dict:
    """A compression preset as Hydra composes it: its `defaults` merged in order (`_self_` last unless placed)."""
    node = OmegaConf.load(CONFIGS / "compression" / f"{preset}.yaml")
    defaults = list(node.pop("defaults", []))
    if "_self_" not in defaults:
        defaults.append("_self_")
    parts = [node if entry == "_self_" else compression(entry) for entry in defaults]
    return OmegaConf.to_container(OmegaConf.merge(*parts), resolve=True)


PRESETS = sorted(p.stem for p in (CONFIGS / "compression").glob("*.yaml"))
BASE = compression("base")


def entry_cases() -> list[tuple[str, str]]:
    return (
        [("method", n) for n in METHODS.names()]
        + [("model", n) for n in MODELS.names()]
        + [("step", n) for n in STEPS.names()]
    )


def registry(kind: str):
    return {"method": METHODS, "model": MODELS, "step": STEPS}[kind]


def fixed(kind: str) -> tuple[str, ...]:
    return {"method": METHOD_FIXED, "model": MODEL_FIXED, "step": ()}[kind]


def path(kind: str, name: str) -> str:
    return {"method": "method", "model": "student.kwargs", "step": f"compression.{name}"}[kind]


def valid_options(kind: str, name: str) -> dict[str, Any]:
    """The published defaults: the method's YAML, the builder's defaults, base.yaml's section."""
    if kind == "method":
        return {k: v for k, v in method_config(name).items() if k != "name"}
    if kind == "model":
        return model_options(MODELS.get(name))
    return dict(BASE[name])


def check(kind: str, name: str, options: dict[str, Any]) -> None:
    registry(kind).check(name, options, fixed=fixed(kind), path=path(kind, name))


def hints(kind: str, name: str) -> dict[str, Any]:
    return option_hints(registry(kind).get(name))


def option_names(kind: str, name: str) -> list[str]:
    params, _ = entry_parameters(registry(kind).get(name))
    return [n for n in params if n not in fixed(kind)]


# ---------------------------------------------------------------- what the annotations say


def without_none(hint: Any) -> Any:
    """`X | None` -> X (None is then one more accepted value, not a kind of number)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        return members[0] if len(members) == 1 else hint
    return hint


def numeric(hint: Any) -> tuple[type, list[Range], bool] | None:
    """(int or float, its ranges, whether it is a list of them) for a numeric option, else None."""
    hint = without_none(hint)
    is_list = typing.get_origin(hint) in (list, typing.get_origin(typing.Sequence[int]))
    if is_list:
        hint = typing.get_args(hint)[0]
    ranges: list[Range] = []
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        ranges = [e for e in extras if isinstance(e, Range)]
    return (hint, ranges, is_list) if hint in (int, float) else None


def outside(base: type, limit: Range) -> list[float]:
    """The nearest value of type `base` just outside each end of `limit` (the end itself when open)."""
    values = []
    if limit.low is not None:
        if base is float:
            values.append(float(limit.low) if limit.low_open else math.nextafter(limit.low, -math.inf))
        else:
            values.append(math.floor(limit.low) if limit.low_open else math.ceil(limit.low) - 1)
    if limit.high is not None:
        if base is float:
            values.append(float(limit.high) if limit.high_open else math.nextafter(limit.high, math.inf))
        else:
            values.append(math.ceil(limit.high) if limit.high_open else math.floor(limit.high) + 1)
    return values


def numeric_cases() -> list[tuple[str, str, str]]:
    return [
        (kind, name, key)
        for kind, name in entry_cases()
        for key, hint in hints(kind, name).items()
        if key in option_names(kind, name) and numeric(hint)
    ]


def range_cases() -> list[tuple[str, str, str, Any]]:
    cases = []
    for kind, name, key in numeric_cases():
        base, ranges, is_list = numeric(hints(kind, name)[key])
        for limit in ranges:
            for value in outside(base, limit):
                cases.append((kind, name, key, [value] if is_list else value))
    return cases


def literal_cases() -> list[tuple[str, str, str]]:
    return [
        (kind, name, key)
        for kind, name in entry_cases()
        for key, hint in hints(kind, name).items()
        if key in option_names(kind, name) and typing.get_origin(without_none(hint)) is Literal
    ]


def flag_cases() -> list[tuple[str, str, str]]:
    return [
        (kind, name, key)
        for kind, name in entry_cases()
        for key, hint in hints(kind, name).items()
        if key in option_names(kind, name) and hint is bool
    ]


def case_id(value: Any) -> str:
    return str(value)[:40]


# ---------------------------------------------------------------- the shipped settings pass


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml")))
def test_every_method_yaml_passes_its_checks(name):
    config = method_config(name)
    assert config["name"] == name
    check_method_options(config)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_compression_preset_passes_its_checks(preset):
    config = compression(preset)
    steps = [s for s in config["steps"] if s != "finetune"] if preset != "base" else STEPS.names()
    assert preset == "base" or steps, preset
    for step in steps:
        STEPS.check(step, config[step], path=f"compression.{step}")
        build_step(step, config[step])  # and builds: no check is left in the constructors to trip


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_default_passes_its_checks(name):
    check_model_options(name, model_options(MODELS.get(name)), path="student.kwargs")


@pytest.mark.parametrize(("kind", "name"), entry_cases(), ids=case_id)
def test_every_option_is_annotated(kind, name):
    """An option without an annotation would be taken unchecked; an annotation that cannot be
    evaluated would switch off the checks of the whole entry."""
    found = hints(kind, name)
    assert [key for key in option_names(kind, name) if key not in found] == []


# ---------------------------------------------------------------- wrong types and ranges name the key


@pytest.mark.parametrize(("kind", "name", "key"), numeric_cases(), ids=case_id)
def test_a_string_for_a_number_names_the_key(kind, name, key):
    _, _, is_list = numeric(hints(kind, name)[key])
    options = {**valid_options(kind, name), key: ["abc"] if is_list else "abc"}
    with pytest.raises(KdError) as error:
        check(kind, name, options)
    message = str(error.value)
    assert f"{path(kind, name)}.{key}=" in message and "abc" in message and "\n" not in message


@pytest.mark.parametrize(("kind", "name", "key", "value"), range_cases(), ids=case_id)
def test_a_value_out_of_range_names_the_key(kind, name, key, value):
    with pytest.raises(KdError, match=rf"^{path(kind, name)}\.{key}=") as error:
        check(kind, name, {**valid_options(kind, name), key: value})
    assert "must be" in str(error.value)


@pytest.mark.parametrize(("kind", "name", "key"), numeric_cases(), ids=case_id)
def test_whole_numbers_refuse_fractions_and_nothing_takes_nan(kind, name, key):
    base, _, is_list = numeric(hints(kind, name)[key])
    bad = 2.5 if base is int else math.nan
    with pytest.raises(KdError, match=rf"^{path(kind, name)}\.{key}="):
        check(kind, name, {**valid_options(kind, name), key: [bad] if is_list else bad})


@pytest.mark.parametrize(("kind", "name", "key"), literal_cases(), ids=case_id)
def test_a_choice_outside_the_list_names_the_key_and_the_choices(kind, name, key):
    choices = typing.get_args(without_none(hints(kind, name)[key]))
    with pytest.raises(KdError, match=rf"^{path(kind, name)}\.{key}='nope' must be one of") as error:
        check(kind, name, {**valid_options(kind, name), key: "nope"})
    assert all(str(choice) in str(error.value) for choice in choices)


@pytest.mark.parametrize(("kind", "name", "key"), flag_cases(), ids=case_id)
def test_a_flag_takes_only_true_or_false(kind, name, key):
    for value in ("yes", 1):
        with pytest.raises(KdError, match=rf"^{path(kind, name)}\.{key}=.* must be true or false"):
            check(kind, name, {**valid_options(kind, name), key: value})


def test_the_issue_examples():
    kd = method_config("kd")
    with pytest.raises(KdError, match=r"^method\.temperature='abc' must be a number \(method 'kd'\)$"):
        check_method_options({**kd, "temperature": "abc"})
    with pytest.raises(KdError, match=r"^method\.temperature=0 must be a number in \(0, 1000\] \(method 'kd'\)$"):
        check_method_options({**kd, "temperature": 0})
    with pytest.raises(KdError, match=r"unknown option student\.kwargs\.widht of model 'cnn'; did you mean width"):
        check_model_options("cnn", {"widht": 3}, path="student.kwargs")
    with pytest.raises(KdError, match="unknown model 'resnt18'"):
        check_model_options("resnt18", {}, path="teacher.kwargs")
    with pytest.raises(KdError, match="pick a method with method=NAME"):
        check_method_options({"temperature": 4.0})


def test_omegaconf_nodes_are_checked_as_plain_values():
    """A list from the command line is a ListConfig: it is a list to the checks, not a wrong type."""
    config = OmegaConf.create({**method_yaml("at"), "student_layers": ["layer1"], "teacher_layers": ["layer2"]})
    check_method_options(config)
    check_model_options("mlp", OmegaConf.create({"hidden": [16, 8], "dropout": 0.1}), path="student.kwargs")
    with pytest.raises(KdError, match=r"^student\.kwargs\.hidden=\[16, 0\]"):
        check_model_options("mlp", OmegaConf.create({"hidden": [16, 0]}), path="student.kwargs")


# ---------------------------------------------------------------- rules that tie options together

FEATURE_METHODS = [n for n in METHODS.names() if issubclass(METHODS.get(n), FeatureDistiller)]

# (method or step, options over its defaults, a fragment of the message)
BAD_COMBINATIONS = [
    ("method", "vid", {"min_variance": 5.0, "init_variance": 5.0}, "min_variance < init_variance"),
    ("method", "vid", {"min_variance": 6.0}, "method.min_variance=6.0"),
    ("method", "ensemble", {"teachers": []}, "method.teachers"),
    ("method", "mlkd", {"temperatures": []}, "method.temperatures is empty"),
    ("method", "mlkd", {"mean": [0.5]}, "method.mean and method.std go together"),
    ("method", "mlkd", {"mean": [0.5, 0.4], "std": [0.2]}, "method.mean has 2 value(s) but method.std has 1"),
    ("method", "ensemble", {"weights": [1.0]}, "method.weights=[1.0] must be 2 non-negative numbers"),
    ("method", "ensemble", {"weights": [1.0, -1.0]}, "non-negative"),
    ("method", "ensemble", {"weights": [0, 0]}, "not all zero"),
    ("method", "crd", {"student_layers": ["layer2", "pool"]}, "method.student_layers names 2 layers"),
    ("method", "crd", {"teacher_layers": ["layer2", "pool"]}, "method.teacher_layers names 2 layers"),
    (
        "method",
        "reviewkd",
        {"student_layers": ["pool"], "teacher_layers": ["pool"]},
        "needs at least one stage map and the embedding",
    ),
    *[
        ("method", name, {"student_layers": ["a", "b"], "teacher_layers": ["c", "d", "e"]}, "as many of each")
        for name in FEATURE_METHODS
        if not METHODS.get(name).single_layer
    ],  # crd: one layer each, above
    ("method", "srd", {"teacher_layers": ["layer2", "layer3"]}, "method=srd compares one layer of each model"),
]
RULES_TESTED_BELOW = {"quantize_int8"}


@pytest.mark.parametrize(("kind", "name", "options", "fragment"), BAD_COMBINATIONS, ids=case_id)
def test_bad_combinations_are_refused_before_building(kind, name, options, fragment):
    with pytest.raises(KdError) as error:
        check(kind, name, {**valid_options(kind, name), **options})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def has_own_rule(entry: Any) -> bool:
    """Whether `entry` has a `validate_options` beyond the shared ones of Distiller (some loss weight
    > 0: tests/test_method_weights.py) and FeatureDistiller (layer counts: tested for every feature
    method above)."""
    if not inspect.isclass(entry):
        return callable(getattr(entry, "validate_options", None))
    shared = (Distiller, FeatureDistiller)
    return any("validate_options" in vars(c) for c in entry.__mro__ if c not in shared)


@pytest.mark.parametrize(("kind", "name"), entry_cases(), ids=case_id)
def test_every_combination_rule_has_a_bad_case_here(kind, name):
    """An entry with a `validate_options` of its own must have a bad case in BAD_COMBINATIONS or a
    test of its own below."""
    if has_own_rule(registry(kind).get(name)):
        assert name in RULES_TESTED_BELOW or any(case[:2] == (kind, name) for case in BAD_COMBINATIONS), name


def test_an_int8_backend_missing_from_this_torch_build_is_refused(monkeypatch):
    """The backend list is the Literal's; which of them this PyTorch build has is only known here."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.backends, "quantized", SimpleNamespace(supported_engines=["qnnpack", "none"]))
    with pytest.raises(
        KdError,
        match=r"^compression\.quantize_int8\.backend=x86 is not available in this "
        r"PyTorch build \(available: qnnpack\)$",
    ):
        check("step", "quantize_int8", valid_options("step", "quantize_int8"))
    check("step", "quantize_int8", {**valid_options("step", "quantize_int8"), "backend": "qnnpack"})


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_good_layer_lists_pass(name):
    count = 1 if METHODS.get(name).single_layer else 2
    check_method_options(
        {**method_config(name), "student_layers": ["a", "b"][:count], "teacher_layers": ["c", "d"][:count]}
    )


# ---------------------------------------------------------------- compression options against the model


def tiny(arch: str = "cnn") -> torch.nn.Module:
    """cnn: stages.{0,1}.{..}.{0: Conv2d, 1: BatchNorm2d, 2: ReLU}, pool, dropout, fc (Linear 16 -> 10);
    mlp: flatten, hidden.0.{0: Linear, 1: ReLU}, dropout, fc."""
    return create_model(arch, 10, 1, 8, **({"width": 8} if arch == "cnn" else {}))


def cnn() -> torch.nn.Module:
    return tiny("cnn")


def step(name: str, **options):
    return build_step(name, {**BASE[name], **options})


def layer_list_cases() -> list[tuple[str, str]]:
    """Every step option that names layers: the `list[str]` ones (a new step's are covered too)."""
    return [
        (name, key)
        for _, name in entry_cases()
        if _ == "step"
        for key, hint in hints("step", name).items()
        if key in option_names("step", name) and hint == list[str]
    ]


def test_the_layer_options_are_found():
    assert {
        ("prune_structured", "ignored_layers"),
        ("prune_unstructured", "skip"),
        ("lowrank", "skip"),
        ("quantize_int8", "layers"),
        ("quantize_int8", "skip"),
    } <= set(layer_list_cases())


@pytest.mark.parametrize(("name", "key"), layer_list_cases(), ids=case_id)
def test_check_refuses_a_layer_the_model_does_not_have_naming_the_key(name, key):
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(name).check(model)  # the defaults pass
    with pytest.raises(KdError, match=rf"^compression\.{name}\.{key}: the model has no layer 'nope'; ") as error:
        step(name, **{key: ["stages.0.0.0", "nope"]}).check(model)
    assert "\n" not in str(error.value)
    after = model.state_dict()  # nothing was compressed
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


# (step, options over base.yaml's, tiny model, the message's start)
BAD_FOR_THE_MODEL = [
    (
        "quantize_int8",
        {"layers": ["stages.0.0.1"]},
        "cnn",
        r"compression\.quantize_int8\.layers: layer 'stages\.0\.0\.1' is a BatchNorm2d; static int8 quantises Conv",
    ),
    (
        "quantize_int8",
        {"mode": "dynamic", "layers": ["stages.0.0.0"]},
        "cnn",
        r"compression\.quantize_int8\.layers: layer 'stages\.0\.0\.0' is a Conv2d; dynamic int8 quantises Linear",
    ),
    ("quantize_int8", {"layers": ["fc"], "skip": ["fc"]}, "cnn", r"compression\.quantize_int8: every layer in layers"),
    (
        "prune_unstructured",
        {"skip": ["stages.1"]},
        "cnn",
        r"compression\.prune_unstructured\.skip: layer 'stages\.1' is a Sequential; .*inside it: stages\.1\.1\.0",
    ),
    (
        "prune_unstructured",
        {"skip": ["stages.0.0.0", "stages.0.1.0", "stages.1.1.0", "stages.1.2.0", "fc"]},
        "cnn",
        r"compression\.prune_unstructured: no conv or linear layer left",
    ),
    (
        "lowrank",
        {"skip": ["stages.0.0.1"]},
        "cnn",
        r"compression\.lowrank\.skip: layer 'stages\.0\.0\.1' is a BatchNorm2d",
    ),
    ("lowrank", {"layers": "conv"}, "mlp", r"compression\.lowrank has no layer to factorise"),
    (
        "lowrank",
        {"rank_ratio": 0.99},
        "cnn",
        r"compression\.lowrank factorised no layer: at this rank none would get smaller",
    ),
    (
        "prune_structured",
        {"importance": "bn_scale"},
        "mlp",
        r"compression\.prune_structured\.importance=bn_scale needs BatchNorm",
    ),
]


@pytest.mark.parametrize(("name", "options", "model", "message"), BAD_FOR_THE_MODEL, ids=case_id)
def test_check_refuses_what_the_model_rules_out_before_compressing(name, options, model, message):
    with pytest.raises(KdError, match=f"^{message}") as error:
        step(name, **options).check(tiny(model))
    assert "\n" not in str(error.value)


def test_every_step_with_a_check_has_a_case_here():
    checked = {name for name, _ in layer_list_cases()} | {case[0] for case in BAD_FOR_THE_MODEL}
    assert {name for name in STEPS.names() if hasattr(STEPS.get(name), "check")} <= checked


def test_steps_after_lowrank_are_checked_against_the_factorised_names():
    """lowrank turns fc into a Sequential of fc.0 and fc.1: the later steps' names are checked
    against what they will see, not refused for naming the new layers."""
    plan = [("lowrank", step("lowrank")), ("finetune", None)]
    check_steps(cnn(), [*plan, ("quantize_int8", step("quantize_int8", layers=["fc.0"], skip=["fc.1"]))])
    with pytest.raises(
        KdError,
        match=r"^compression\.quantize_int8\.layers: layer 'fc' is a Sequential; .*"
        r"inside it: fc\.0",
    ):
        check_steps(cnn(), [*plan, ("quantize_int8", step("quantize_int8", layers=["fc"]))])
    with pytest.raises(KdError, match=r"^compression\.quantize_int8\.layers: the model has no layer 'fc\.0'"):
        check_steps(cnn(), [("quantize_int8", step("quantize_int8", layers=["fc.0"]))])
    with pytest.raises(KdError, match=r"^compression\.prune_structured\.ignored_layers: the model has no layer 'nope'"):
        check_steps(cnn(), [("prune_structured", step("prune_structured", ignored_layers=["nope"])), *plan])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.epochs=100000000000", "trainer.epochs=100000000000 must be in [1, 1000000]"),
        ("trainer.num_workers=100000", "trainer.num_workers=100000 must be in [0, 256]"),
        ("trainer.batch_size=10000000000", "trainer.batch_size=10000000000 must be in [1, 1048576]"),
        ("trainer.max_steps_per_epoch=10000000000", "must be <= 2147483647"),
        ("method=dml method.students=1000", "method.students=1000 must be a whole number in [2, 16]"),
        ("method=born_again method.generations=100000000000", "method.generations"),
        (
            "dataset=synthetic dataset.num_train=100000000",
            "dataset.num_train=100000000 must be a whole number in [1, 10000000]",
        ),
        ("dataset=synthetic dataset.image_size=1000 dataset.num_train=10000", "would hold 30.7 GiB"),
    ],
)
def test_every_count_has_a_bound_checked_first(tmp_path, override, fragment):
    """A count typed with too many digits is one line before anything is loaded, not a run out of memory,
    processes or time."""
    assert_one_line_error(kd_here("distill", *override.split(), cwd=tmp_path), fragment)
    assert not list(tmp_path.glob("outputs/*/*/*"))  # no run directory (date folders are left: see guarded)
