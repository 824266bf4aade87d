"""The optimiser and the learning-rate schedule: the closed forms, the fused kernels, the settings' checks."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kd_cli.engine.optimizers import build_optimizer, param_groups, use_fused
from kd_cli.engine.schedule import Schedule, set_lr
from kd_cli.engine.values import check_optim, compile_mode
from kd_cli.errors import KdError

CONFIGS = Path(__file__).parents[1] / "configs"
SGD = OmegaConf.load(CONFIGS / "optim/sgd.yaml")


def optim(**changes):
    return OmegaConf.merge(SGD, changes)


def test_cosine_runs_from_lr_to_min_lr_after_the_warm_up():
    schedule = Schedule.from_config(optim(lr=0.1, min_lr=0.01, warmup_epochs=2), epochs=12)
    assert schedule.at(0) == 0.0
    assert schedule.at(1) == pytest.approx(0.05)  # linear warm-up, half way
    assert schedule.at(2) == pytest.approx(0.1)
    assert schedule.at(7) == pytest.approx(0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * 0.5)))
    assert schedule.at(12) == pytest.approx(0.01)
    assert schedule.at(13) == pytest.approx(0.01)  # past the end: the floor, not a second cycle


def test_multistep_multiplies_by_gamma_at_each_milestone_passed():
    schedule = Schedule.from_config(optim(lr=0.05, schedule="multistep", milestones=[150, 180, 210]), epochs=240)
    assert [schedule.at(e) for e in (0, 149.9, 150, 180, 239)] == pytest.approx([0.05, 0.05, 5e-3, 5e-4, 5e-5])


def test_poly_decays_as_one_minus_progress_to_the_power_0_9():
    schedule = Schedule.from_config(optim(lr=0.02, schedule="poly"), epochs=30)
    assert schedule.at(0) == 0.02 and schedule.at(30) == 0.0 and schedule.at(31) == 0.0
    assert schedule.at(15) == pytest.approx(0.02 * 0.5**0.9)  # torchvision's reference: (1 - it / its) ** 0.9


def test_constant_is_lr_everywhere():
    schedule = Schedule.from_config(optim(lr=0.3, schedule="constant"), epochs=5)
    assert {schedule.at(e / 3) for e in range(15)} == {0.3}


def test_the_loop_sets_the_rate_of_every_group_by_its_scale():
    fast, slow = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    params = list(fast.parameters()) + list(slow.parameters())
    optimizer = build_optimizer(param_groups(params, slow.parameters(), 0.1), optim(lr=1.0))
    set_lr(optimizer, 0.5)
    assert sorted(group["lr"] for group in optimizer.param_groups) == pytest.approx([0.05, 0.5])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_auto_takes_the_fused_kernels_on_the_cpu_and_trains_as_the_default_does(name):
    config = OmegaConf.merge(OmegaConf.load(CONFIGS / f"optim/{name}.yaml"), {"lr": 0.01})
    finals = []
    for fused in ("auto", "false"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        optimizer = build_optimizer(model.parameters(), OmegaConf.merge(config, {"fused": fused}))
        assert bool(optimizer.defaults["fused"]) == (fused == "auto")
        data = torch.Generator().manual_seed(1)
        for _ in range(20):
            images, labels = torch.randn(16, 8, generator=data), torch.randint(0, 3, (16,), generator=data)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


def test_fused_true_on_tensors_torch_has_no_fused_kernel_for_is_one_line():
    integers = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64), requires_grad=True)
    assert use_fused("true", [integers]) is True
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert use_fused("auto", [meta]) is None
    with pytest.raises(KdError, match="optim.fused=true.*meta.*optim.fused=auto"):
        use_fused("true", [meta])


def test_settings_outside_their_choices_are_refused():
    with pytest.raises(KdError, match="optim.fused=sometimes is not one of auto, true, false"):
        check_optim(optim(fused="sometimes"), epochs=5)
    with pytest.raises(KdError, match="trainer.compile=fastest is not one of false, true, default"):
        compile_mode("fastest")
    assert [compile_mode(v) for v in (False, True, "reduce-overhead")] == [None, "default", "reduce-overhead"]


def test_fused_sgd_steps_when_parameters_get_their_first_gradient_late():
    """A two-phase method (FSP) trains some layers first and the classifier later: torch's fused SGD alone
    cannot mix parameters with and without momentum buffers; kd's matches the default SGD there."""
    finals = []
    for fused in ("auto", "false"):
        torch.manual_seed(0)
        body, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        params = [*body.parameters(), *head.parameters()]
        optimizer = build_optimizer(params, optim(lr=0.1, fused=fused))
        data = torch.Generator().manual_seed(1)
        for step in range(6):
            images = torch.randn(8, 4, generator=data)
            optimizer.zero_grad()
            loss = body(images).pow(2).mean() if step < 3 else head(torch.relu(body(images))).pow(2).mean()
            loss.backward()
            optimizer.step()
        finals.append(torch.cat([p.detach().flatten() for p in params]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-6, atol=1e-7)
