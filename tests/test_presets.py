"""The experiment presets compose, with the per-pair settings of the literature (Hydra's Compose API:
fast, and enough to check composition; the CLI itself is exercised by the other tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kd_cli.methods import METHODS
from kd_cli.registry import check_options
from kd_cli.stages.checks import check_config

PRESETS = sorted(
    str(p.relative_to(Path(__file__).parents[1] / "configs" / "experiment").with_suffix(""))
    for p in (Path(__file__).parents[1] / "configs" / "experiment").rglob("*.yaml")
)
DKD_BETA = {
    "resnet56_resnet20": 2.0,
    "resnet110_resnet32": 2.0,
    "resnet32x4_resnet8x4": 8.0,
    "wrn_40_2_wrn_16_2": 6.0,
    "wrn_40_2_wrn_40_1": 6.0,
    "vgg13_vgg8": 6.0,
    "resnet32x4_shufflenetv2": 8.0,
    "vgg13_mobilenetv2": 6.0,
}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("cifar100")])
def test_every_preset_composes_with_valid_method_options(preset, compose_config):
    cfg = compose_config("distill", f"experiment={preset}")
    check_config(cfg)  # every check the CLI makes before any work
    OmegaConf.resolve(cfg)
    method = dict(cfg.method)
    check_options(
        f"method {method['name']}",
        METHODS.get(method.pop("name")),
        method,
        exclude=("student", "teacher", "num_samples"),
    )
    assert cfg.dataset.name == "cifar100" and cfg.trainer.epochs == 240
    assert list(cfg.optim.milestones) == [150, 180, 210]


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("coco_voc")])
def test_the_segmentation_presets_compose_with_the_tasks_method(preset, compose_config):
    cfg = compose_config("distill", f"experiment={preset}")
    check_config(cfg, [f"experiment={preset}"])  # no method= given: kd's segmentation counterpart
    assert cfg.dataset.name == "coco_segmentation" and cfg.method.name == "pixel_kd"
    assert cfg.optim.schedule == "poly" and cfg.trainer.epochs == 30


def test_cifar100_table_presets_cover_the_pairs_and_methods():
    for method in ("kd", "dkd", "crd", "fitnet", "at", "reviewkd"):
        assert {p.split("/")[-1] for p in PRESETS if p.startswith(f"cifar100/{method}/")} == set(DKD_BETA)


@pytest.mark.parametrize("pair", sorted(DKD_BETA))
def test_per_pair_settings(pair, compose_config):
    cfg = compose_config("distill", f"experiment=cifar100/dkd/{pair}")
    assert cfg.method.beta == DKD_BETA[pair]
    small_student = cfg.student.arch in ("mobilenetv2", "shufflenetv2")
    assert cfg.optim.lr == (0.01 if small_student else 0.05)
    assert f"{cfg.teacher.arch}_{cfg.student.arch}" == pair


# ---------------------------------------------------------------- the per-method Optuna search spaces

SEARCHES = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "hparams_search").glob("*_optuna.yaml"))


def interval_of(expression: str) -> tuple[float, float]:
    """`interval(a, b)` or `tag(log, interval(a, b))` -> (a, b)."""
    inside = expression.split("interval(", 1)[1].split(")", 1)[0]
    low, high = (float(x) for x in inside.split(","))
    return low, high


def test_every_method_with_weights_to_tune_has_a_search_preset():
    tuned = {name[: -len("_optuna")] for name in SEARCHES}
    fixed_recipes = {"none", "born_again", "ensemble"}  # CE alone, a KD chain, weights set by the user
    assert tuned == set(METHODS.names()) - fixed_recipes


@pytest.mark.parametrize("search", SEARCHES)
def test_a_search_preset_picks_its_method_and_searches_its_options_around_the_defaults(search, compose_config):
    import yaml

    method = search[: -len("_optuna")]
    cfg = compose_config("distill", f"hparams_search={search}", hydra_config=True)
    assert cfg.method.name == method and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.direction == "maximize"
    params = dict(cfg.hydra.sweeper.params)
    assert params, search
    defaults = yaml.safe_load((Path(__file__).parents[1] / "configs" / "method" / f"{method}.yaml").read_text())
    for key, expression in params.items():
        option = key.removeprefix("method.")
        assert key.startswith("method.") and option in defaults, key
        low, high = interval_of(expression)
        assert low < high and low <= defaults[option] <= high, (key, defaults[option], expression)


def test_the_checks_run_on_a_composed_config_refuse_what_the_cli_refuses(compose_config):
    """The in-process composition is the CLI's: the same checks refuse the same value."""
    from kd_cli.errors import KdError

    with pytest.raises(KdError, match=r"trainer.epochs=0 must be in \[1, 1000000\]"):
        check_config(compose_config("distill", "experiment=cifar100/kd/resnet56_resnet20", "trainer.epochs=0"))
