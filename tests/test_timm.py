"""timm models by name as teacher and student, with weights from a local file or timm's cache, and
fine-tuning with a lower learning rate for the pretrained layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kdrun import FAST as QUICK
from kdrun import assert_one_line_error, kd_here, summary
from safetensors.torch import load_file, save_file

from kd_cli.errors import KdError
from kd_cli.models import check_model_options, create_model
from kd_cli.models.features import backbone_parameters, classifier_module, feature_shapes

# timm's test_resnet on 8x8 digits reaches 1x1 maps whose BatchNorm overflows under bf16 autocast within a
# few steps (a plain PyTorch loop does the same): these tests are about timm models in kd, so they train
# in fp32 (precision=auto would take bf16 on a CPU with bf16 units).
FAST = [*QUICK, "trainer.precision=fp32"]

timm = pytest.importorskip("timm")


def imagenet_like_weights(path: Path, name: str = "test_resnet") -> dict[str, torch.Tensor]:
    """A 1000-class, 3-channel timm network's weights, as a pretrained file would hold them."""
    torch.manual_seed(0)
    state = timm.create_model(name, num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def test_any_timm_name_builds_for_the_data_with_feature_layers():
    model = create_model("timm/test_resnet", 10, 1, 32)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    shapes = feature_shapes(model, [*model.kd_feature_layers, model.kd_embedding_layer], 1, 32)
    assert len(model.kd_feature_layers) == 4 and len(shapes[model.kd_embedding_layer]) == 1
    vit = create_model("timm/test_vit", 5, 3, 32)  # a fixed-grid model gets the data's image size
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    # the embedding hook adds no weights: the state dict keeps timm's own keys
    assert set(model.state_dict()) == set(timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict())


@pytest.mark.parametrize(
    "call, fragments",
    [
        (lambda: create_model("timm/resnt18", 10), ["unknown timm model 'resnt18'", "did you mean resnet18"]),
        (
            lambda: check_model_options("timm/test_resnet", {"widht": 3}, "student.kwargs"),
            ["unknown option student.kwargs.widht"],
        ),
        (
            lambda: check_model_options("timm/test_resnet", {"drop_rate": 1.5}, "teacher.kwargs"),
            ["teacher.kwargs.drop_rate=1.5"],
        ),
        (
            lambda: check_model_options("timm/test_resnet", {"pretrained": True, "weights": "w.pt"}, "teacher.kwargs"),
            ["pretrained=true or weights=PATH, not both"],
        ),
    ],
)
def test_bad_timm_options_are_one_line(call, fragments):
    with pytest.raises(KdError) as error:
        call()
    assert all(f in str(error.value) for f in fragments) and "\n" not in str(error.value)


def test_without_timm_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(KdError, match=r"pip install 'kd-cli\[timm\]'"):
        create_model("timm/test_resnet", 10)


def test_weights_from_a_local_file_new_classifier_and_adapted_first_conv(tmp_path):
    state = imagenet_like_weights(tmp_path / "w.safetensors")
    model = create_model("timm/test_resnet", 10, 1, 32, weights=str(tmp_path / "w.safetensors"))
    own = model.state_dict()
    assert torch.equal(own["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    # a grey first conv is the RGB one summed over its channels (timm's adapt_input_conv)
    first = [k for k in state if k.endswith("weight") and state[k].dim() == 4][0]
    assert torch.allclose(own[first], state[first].sum(1, keepdim=True), atol=1e-6)
    assert own["fc.weight"].shape == (10, state["fc.weight"].shape[1])  # new head for 10 classes
    # a state dict from torch.save, nested and DDP-prefixed, loads the same
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    again = create_model("timm/test_resnet", 10, 1, 32, weights=str(tmp_path / "w.pth"))
    assert torch.equal(again.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    wrong = {k: v for k, v in state.items() if not k.startswith("layer4")}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(KdError, match=r"missing \(e\.g\. layer4"):
        create_model("timm/test_resnet", 10, 1, 32, weights=str(tmp_path / "wrong.pt"))


def fake_hub_cache(root: Path, tag: str = "test_resnet.r160_in1k") -> dict[str, torch.Tensor]:
    """timm's pretrained weights as the Hugging Face cache lays them out (what a download leaves)."""
    repo = root / f"models--timm--{tag}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return imagenet_like_weights(snapshot / "model.safetensors", tag.split(".")[0])


def test_pretrained_comes_from_the_cache_offline_or_says_where_to_put_it(tmp_path):
    state = fake_hub_cache(tmp_path / "hub")
    code = (
        "from kd_cli.models import create_model; import sys; "
        "m = create_model('timm/test_resnet.r160_in1k', 10, 3, 32, pretrained=True); "
        "from safetensors.torch import save_file; save_file(m.state_dict(), sys.argv[1])"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out.safetensors")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(loaded["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])

    result = kd_here(
        "train-teacher",
        "teacher.arch=timm/test_resnet.r160_in1k",
        "++teacher.kwargs.pretrained=true",
        *FAST,
        f"paths.outputs={tmp_path / 'o'}",
        cwd=tmp_path,
    )
    if result.code == 0:  # a machine with internet downloads the weights: nothing to check here
        pytest.skip("this machine reached the Hugging Face hub")
    assert_one_line_error(result, "no pretrained weights for timm/test_resnet.r160_in1k", "weights=PATH")


def test_fine_tune_from_a_weights_file_with_a_slow_backbone(tmp_path):
    """kd train-teacher from pretrained weights: a new classifier for the data's classes learns at the
    full rate, the pretrained layers at backbone_lr_scale of it."""
    state = imagenet_like_weights(tmp_path / "w.safetensors")
    run = tmp_path / "teacher"
    result = kd_here(
        "train-teacher",
        "teacher.arch=timm/test_resnet",
        f"teacher.kwargs.weights={tmp_path / 'w.safetensors'}",
        "optim.backbone_lr_scale=1e-9",
        "optim.weight_decay=0",
        "trainer.epochs=1",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    # the digits are normalised with their own statistics, not the ones timm's data config gives the weights
    assert (
        "pretrained weights expect images normalised with mean [0.5] / std [0.5] (timm's data config)" in result.stderr
    )
    tuned = load_file(str(run / "model.safetensors"))
    assert (tuned["layer3.0.conv1.weight"] - state["layer3.0.conv1.weight"]).abs().max() < 1e-6  # barely moved
    assert tuned["fc.weight"].shape == (10, state["fc.weight"].shape[1])
    fresh = create_model("timm/test_resnet", 10, 1, 8, weights=str(tmp_path / "w.safetensors"))
    assert (tuned["fc.weight"] - fresh.state_dict()["fc.weight"]).abs().max() > 1e-3  # the head learned
    assert summary(run)["status"] == "complete"


def test_param_groups_split_the_classifier_from_the_backbone():
    from kd_cli.engine.optimizers import param_groups

    model = create_model("timm/test_resnet", 10, 1, 8)
    head = classifier_module(model)
    groups = param_groups(model.parameters(), backbone_parameters(model), 0.1)
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.parameters()}
    assert len(param_groups(model.parameters(), backbone_parameters(model), 1.0)) == 1
    zoo = create_model("cnn", 10, 1, 8)
    assert classifier_module(zoo) is zoo.fc


def test_a_timm_teacher_teaches_a_kd_student_with_a_feature_method(tmp_path):
    result = kd_here(
        "distill",
        "teacher.arch=timm/test_resnet",
        "student.arch=cnn",
        "method=at",
        "method.teacher_layers=[layer3,layer4]",
        "method.student_layers=[stages.0,stages.1]",
        "trainer.epochs=1",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    done = summary(tmp_path / "s")
    assert done["status"] == "complete" and done["teacher_arch"] == "timm/test_resnet"
