"""One way to extend kd: every registry (methods, model families, data sets, compression steps,
optimisers) is a `kd_cli.registry.Registry`, filled by `register(name)` decorators in modules that
their package imports by itself, and every registered name with a YAML has one whose keys are its
options, exactly: a key the code does not take, or an option the YAML leaves out, fails here.

Where defaults live, one rule per kind:
- methods, compression steps, optimisers: in the YAML only; the code's signature has none (a default in
  code would be a second, unchecked source).
- models: in the builder's signature only (models have no YAML; kd_cli/model_index reads the signature).
- data sets: in the YAML, which is what runs; the loader's signature holds the same values (the loader is
  also called from Python, by tests and users), and this file fails where the two differ."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kd_cli.compress import STEPS
from kd_cli.data import COMMON_KEYS, DATASETS
from kd_cli.engine.optimizers import OPTIMIZERS
from kd_cli.methods import FIXED as METHOD_FIXED
from kd_cli.methods import METHODS
from kd_cli.model_index import model_options
from kd_cli.models import MODELS
from kd_cli.models.registry import FIXED as MODEL_FIXED
from kd_cli.registry import Registry, check_options, entry_parameters

CONFIGS = Path(__file__).parents[1] / "configs"
PACKAGES = Path(__file__).parents[1] / "kd_cli"


def keyword_options(entry, fixed=()) -> dict[str, inspect.Parameter]:
    """The entry's options as the registry reads them (a feature method's inherited ones too)."""
    params, _ = entry_parameters(entry)
    return {name: p for name, p in params.items() if name not in fixed and name != "params"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_registry_is_the_one_registry_class():
    for registry in (METHODS, MODELS, DATASETS, STEPS, OPTIMIZERS):
        assert isinstance(registry, Registry) and registry.names()


@pytest.mark.parametrize("name", METHODS.names())
def test_a_methods_yaml_holds_exactly_its_options_and_the_code_no_defaults(name):
    config = load(CONFIGS / "method" / f"{name}.yaml")
    options = keyword_options(METHODS.get(name), ("self", *METHOD_FIXED))
    assert config["name"] == name
    assert set(config) - {"name"} == set(options), name
    assert all(p.default is inspect.Parameter.empty for p in options.values()), "the YAML holds the defaults"
    assert METHODS.get(name).method_name == name  # the registry names the class (for its messages)


def test_every_method_yaml_is_a_registered_method():
    assert {p.stem for p in (CONFIGS / "method").glob("*.yaml")} == set(METHODS.names())


@pytest.mark.parametrize("name", STEPS.names())
def test_a_compression_steps_section_holds_exactly_its_options(name):
    section = load(CONFIGS / "compression" / "base.yaml")[name]
    options = keyword_options(STEPS.get(name), ("self",))
    assert set(section) == set(options), name
    assert all(p.default is inspect.Parameter.empty for p in options.values()), "the YAML holds the defaults"
    assert STEPS.get(name).name == name


def test_every_compression_section_is_a_registered_step():
    base = load(CONFIGS / "compression" / "base.yaml")
    assert set(base) - {"name", "steps"} == set(STEPS.names())


@pytest.mark.parametrize("name", DATASETS.names())
def test_a_data_sets_yaml_holds_the_common_keys_and_exactly_its_loaders_options(name):
    config = load(CONFIGS / "dataset" / f"{name}.yaml")
    assert config["name"] == name and COMMON_KEYS <= set(config)
    assert set(config) - COMMON_KEYS == set(keyword_options(DATASETS.get(name))), name


@pytest.mark.parametrize("name", DATASETS.names())
def test_a_data_sets_loader_defaults_are_its_yamls_values(name):
    node = OmegaConf.to_container(
        OmegaConf.merge({"paths": {"data": "data"}}, {"dataset": OmegaConf.load(CONFIGS / "dataset" / f"{name}.yaml")}),
        resolve=True,
    )["dataset"]
    options = {key: value for key, value in node.items() if key not in COMMON_KEYS}
    check_options(name, DATASETS.get(name), options)
    defaults = {key: p.default for key, p in inspect.signature(DATASETS.get(name)).parameters.items()}
    assert all(p is not inspect.Parameter.empty for p in defaults.values()), f"{name}: every option has a default"
    if defaults["root"] is None:
        options.pop("root")  # unused by the embedded data sets (digits, synthetic): their code says None
    assert {key: defaults[key] for key in options} == options, name


def test_every_dataset_yaml_is_a_registered_data_set():
    assert {p.stem for p in (CONFIGS / "dataset").glob("*.yaml")} == set(DATASETS.names())


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_an_optimisers_yaml_holds_what_its_builder_takes(name):
    config = load(CONFIGS / "optim" / f"{name}.yaml")
    assert config["name"] == name
    options = keyword_options(OPTIMIZERS.get(name), ("fused",))
    assert set(options) <= set(config), name
    assert all(p.default is inspect.Parameter.empty for p in options.values()), "the YAML holds the defaults"


def test_every_optim_yaml_is_a_registered_optimiser_with_the_same_keys():
    configs = {p.stem: set(load(p)) for p in (CONFIGS / "optim").glob("*.yaml")}
    assert set(configs) == set(OPTIMIZERS.names())
    assert len({frozenset(keys) for keys in configs.values()}) == 1, "optim files differ in keys (the schema's)"


@pytest.mark.parametrize("name", MODELS.names())
def test_a_model_builder_takes_the_data_sets_shape_and_defaults_every_option(name):
    """Models have no YAML: their options are the builder's keyword defaults (kd_cli/model_index)."""
    params = inspect.signature(MODELS.get(name)).parameters
    assert set(MODEL_FIXED) <= set(params), name
    assert set(model_options(MODELS.get(name))) == set(params) - set(MODEL_FIXED) - {"kwargs"} or name == "hf", name
    assert not (CONFIGS / "student" / f"{name}.yaml").exists(), "a model's defaults are its signature's only"


@pytest.mark.parametrize("package", ["methods", "models", "data", "compress"])
def test_each_package_imports_its_modules_itself(package):
    """Adding a method, model family, data set or step is adding a file: no hand-kept list of modules."""
    source = (PACKAGES / package / "__init__.py").read_text()
    assert "import_submodules(__name__, __path__)" in source
    modules = [p.stem for p in (PACKAGES / package).glob("*.py") if p.stem != "__init__"]
    assert not [m for m in modules if f"import {m}," in source or f"import {m}\n" in source]
