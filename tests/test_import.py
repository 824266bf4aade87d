"""`kd import`: the checkpoints people have (plain, nested, wrapper-prefixed, safetensors, Hugging Face
folders) become kd models whose predictions equal the original module's, through `kd evaluate`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from kdrun import FAST, assert_one_line_error, kd, kd_here, kd_here_ok, summary
from safetensors.torch import save_file

from kd_cli.data import load_dataset, make_loader
from kd_cli.engine.artifacts import load_model
from kd_cli.engine.metrics import predict
from kd_cli.models import create_model

DIGITS = {"name": "digits"}
MEAN, STD = [0.3053], [0.3759]


def trained_cnn(steps: int = 30) -> torch.nn.Module:
    """A kd-zoo CNN trained a few steps on the digits with a plain PyTorch loop (someone else's code)."""
    torch.manual_seed(0)
    model = create_model("cnn", 10, 1, 8)
    data = load_dataset(DIGITS)
    x = (data.train.images.float() / 255 - MEAN[0]) / STD[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        index = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[index]), data.train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def original() -> tuple[torch.nn.Module, torch.Tensor]:
    model = trained_cnn()
    data = load_dataset(DIGITS)
    loader = make_loader(data.test, batch_size=256, train=False, spec=None, mean=MEAN, std=STD, device="cpu", seed=0)
    logits, _ = predict(model, loader, torch.device("cpu"))
    return model, logits


def plain(state):
    return state


FORMS = {
    "state_dict.pt": lambda s: torch.save(s, "{path}"),
    "nested_state_dict.pth": lambda s: {"state_dict": s, "epoch": 7, "optimizer": {"lr": 0.1}},
    "nested_model.pth": lambda s: {"model": s, "args": {"arch": "cnn"}},
    "nested_ema.ckpt": lambda s: {"ema": s, "step": 100},
    "nested_beside_a_tensor.pth": lambda s: {"state_dict": s, "best_acc1": torch.tensor(93.2)},
    "ddp_module.pth": lambda s: {f"module.{k}": v for k, v in s.items()},
    "lightning.ckpt": lambda s: {
        "state_dict": {f"model.{k}": v for k, v in s.items()},
        "global_step": 3,
        "pytorch-lightning_version": "2.4.0",
    },
    "compiled_orig_mod.pt": lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
    "ddp_and_compiled.pt": lambda s: {f"module._orig_mod.{k}": v for k, v in s.items()},
}


def write_form(name: str, model: torch.nn.Module, folder: Path) -> Path:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if name == "weights.safetensors":
        save_file(state, str(folder / name))
        return folder / name
    if name == "hf_folder":
        (folder / name).mkdir()
        save_file(state, str(folder / name / "model.safetensors"))
        (folder / name / "config.json").write_text(json.dumps({"architectures": ["CNN"], "num_labels": 10}))
        return folder / name
    if name == "hf_bin_folder":
        (folder / name).mkdir()
        torch.save(state, folder / name / "pytorch_model.bin")
        return folder / name
    content = state if name == "state_dict.pt" else FORMS[name](state)
    torch.save(content, folder / name)
    return folder / name


@pytest.mark.parametrize("form", [*(n for n in FORMS), "weights.safetensors", "hf_folder", "hf_bin_folder"])
def test_import_round_trip_equals_the_original_module(original, tmp_path, form):
    model, expected = original
    source = write_form(form, model, tmp_path)
    run = tmp_path / "imported"
    result = kd_here("import", str(source), "arch=cnn", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    imported, spec = load_model(run)
    data = load_dataset(DIGITS)
    loader = make_loader(
        data.test, batch_size=256, train=False, spec=None, mean=spec.mean, std=spec.std, device="cpu", seed=0
    )
    logits, labels = predict(imported, loader, torch.device("cpu"))
    assert (logits - expected).abs().max().item() <= 1e-5
    # and through kd evaluate, as a user would check it
    scored = kd_here("evaluate", f"run={run}", *FAST, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert scored.code == 0, scored.stderr
    top1 = 100.0 * (expected.argmax(1) == labels).float().mean().item()
    assert summary(tmp_path / "eval")["top1"] == pytest.approx(top1, abs=1e-6)
    assert summary(run)["top1"] == pytest.approx(top1, abs=1e-6) and summary(run)["role"] == "imported"
    env = json.loads((run / "env.json").read_text())
    assert len(env["source_sha256"]) == 16


def test_a_timm_checkpoint_with_a_wrapper_prefix_imports_and_teaches(tmp_path):
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(1)
    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    torch.save({"model_ema": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "timm.pth")
    run = tmp_path / "imported"
    result = kd_here(
        "import", str(tmp_path / "timm.pth"), "arch=timm/test_resnet", *FAST, f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.code == 0, result.stderr
    imported, _ = load_model(run)
    x = torch.randn(3, 1, 8, 8)
    assert (imported(x) - net.eval()(x)).abs().max().item() <= 1e-5
    student = tmp_path / "student"
    distilled = kd_here(
        "distill",
        f"teacher.checkpoint={run}",
        "trainer.epochs=1",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={student}",
        cwd=tmp_path,
    )
    assert distilled.code == 0, distilled.stderr
    assert summary(student)["teacher_run"] == str(run)


def test_mismatched_weights_are_one_line_with_counts_and_first_names(original, tmp_path):
    model, _ = original
    source = write_form("ddp_module.pth", model, tmp_path)
    result = kd_here("import", str(source), "arch=mlp", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    line = assert_one_line_error(result, "do not fit the model", "missing (e.g.", "unexpected (e.g.")
    assert len(line) < 600 and not (tmp_path / "r").exists()
    wrong_classes = kd_here(
        "import",
        str(source),
        "arch=cnn",
        "dataset=synthetic",
        "dataset.num_classes=5",
        "dataset.image_size=8",
        "dataset.channels=1",
        "dataset.mean=[0.5]",
        "dataset.std=[0.25]",
        *FAST,
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert_one_line_error(wrong_classes, "of another shape", "fc.weight [10, 64] vs [5, 64]")


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, capfd):
    source = tmp_path / "evil.pth"
    with open(source, "wb") as handle:
        pickle.dump({"state_dict": Payload()}, handle)
    result = kd_here("import", str(source), "arch=cnn", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_one_line_error(result, "weights_only=True", "save model.state_dict()")
    assert "pwned" not in result.stdout + result.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "content, fragments",
    [
        (b"garbage", ["bad.pt is not a checkpoint"]),
        (b"epoch 1 loss 0.5\nhello\n", ["bad.pt is not a checkpoint"]),
        (bytes(4096), ["bad.pt is not a checkpoint"]),
        (b"PK\x03\x04" + bytes(60), ["bad.pt is a corrupt PyTorch checkpoint"]),
        (b"\x80\x02" + b"}q\x00(X", ["bad.pt is a corrupt PyTorch checkpoint"]),
        ({"epoch": 3, "lr": 0.1}, ["holds no state dict", "nested=KEY"]),
        ([1, 2, 3], ["holds a list, not a state dict"]),
    ],
)
def test_bad_checkpoints_are_one_line(tmp_path, content, fragments):
    source = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        torch.save(content, source)
    result = kd_here("import", str(source), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "r").exists()


def test_nested_key_and_missing_source(original, tmp_path):
    model, _ = original
    torch.save({"student": model.state_dict(), "teacher": {"x": torch.zeros(1)}}, tmp_path / "two.pt")
    run = tmp_path / "r"
    ok = kd_here(
        "import", str(tmp_path / "two.pt"), "arch=cnn", "nested=student", *FAST, f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert ok.code == 0, ok.stderr
    missing = kd_here(
        "import",
        str(tmp_path / "two.pt"),
        "arch=cnn",
        "nested=ema",
        *FAST,
        f"hydra.run.dir={tmp_path / 'r2'}",
        cwd=tmp_path,
    )
    assert_one_line_error(missing, "no state dict under 'ema'", "student", "teacher")
    gone = kd_here(
        "import", str(tmp_path / "nope.pt"), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r3'}", cwd=tmp_path
    )
    assert_one_line_error(gone, "does not exist")


def hf_vit_folder(folder: Path, num_labels: int = 10, image_size: int = 8, labels: list[str] | None = None):
    """A tiny transformers ViT image classifier, as save_pretrained writes it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=image_size,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
        num_channels=1,
        **({"id2label": dict(enumerate(labels))} if labels else {}),
    )
    network = transformers.ViTForImageClassification(config).eval()
    network.save_pretrained(folder)
    return network


def test_a_hugging_face_image_classifier_folder_round_trip(tmp_path):
    network = hf_vit_folder(tmp_path / "vit")
    run = tmp_path / "imported"
    result = kd_here("import", str(tmp_path / "vit"), "arch=hf", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    imported, spec = load_model(run)  # rebuilt from model.json alone: the config travels in it
    assert spec.kwargs["config"]["model_type"] == "vit"
    data = load_dataset(DIGITS)
    loader = make_loader(data.test, batch_size=256, train=False, spec=None, mean=MEAN, std=STD, device="cpu", seed=0)
    logits, labels = predict(imported, loader, torch.device("cpu"))
    with torch.no_grad():
        expected = torch.cat([network(pixel_values=x).logits for x, _ in loader])
    assert (logits - expected).abs().max().item() <= 1e-5
    scored = kd_here("evaluate", f"run={run}", *FAST, f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert scored.code == 0, scored.stderr
    top1 = 100.0 * (expected.argmax(1) == labels).float().mean().item()
    assert summary(tmp_path / "eval")["top1"] == pytest.approx(top1, abs=1e-6)
    taught = kd_here(
        "distill",
        f"teacher.checkpoint={run}",
        "trainer.epochs=1",
        *FAST,
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'student'}",
        cwd=tmp_path,
    )
    assert taught.code == 0, taught.stderr


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"image_size": 16}, ["takes 16px images", "dataset.image_size=16"]),
        ({"num_labels": 3}, ["classifies 3 classes", "the data set has 10"]),
    ],
)
def test_a_hugging_face_folder_for_other_data_is_one_line(tmp_path, kwargs, fragments):
    hf_vit_folder(tmp_path / "vit", **kwargs)
    result = kd_here("import", str(tmp_path / "vit"), "arch=hf", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "r").exists()


def test_hugging_face_class_names_that_differ_are_a_warning(tmp_path):
    hf_vit_folder(tmp_path / "vit", labels=[f"digit {k}" for k in range(10)])
    result = kd_here("import", str(tmp_path / "vit"), "arch=hf", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "kd: warning:" in result.stderr and "digit 0" in result.stderr


def test_without_transformers_the_error_says_how_to_install(monkeypatch):
    import sys

    from kd_cli.errors import KdError

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(KdError, match=r"pip install 'kd-cli\[hf\]'"):
        create_model("hf", 10, 1, 8, config={"model_type": "vit"})


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_weights_of_a_kind_the_model_cannot_hold_are_refused(original, tmp_path, dtype):
    """Complex (torch would drop the imaginary parts with a warning), integer or boolean values for float
    parameters: one line naming a tensor and the two kinds of number; nothing written."""
    model, _ = original
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "odd.pth")
    result = kd_here(
        "import", str(tmp_path / "odd.pth"), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    name = str(dtype).removeprefix("torch.")
    assert_one_line_error(result, "cannot take as they were trained", f"{name} for float32")
    assert "Warning" not in result.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_in_another_float_width_are_taken(original, tmp_path, dtype):
    model, _ = original
    torch.save(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}, tmp_path / "w.pt"
    )
    result = kd_here(
        "import", str(tmp_path / "w.pt"), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    assert result.code == 0, result.stderr


def test_a_saved_kd_model_retyped_on_disk_is_one_line(original, tmp_path):
    """model.safetensors edited to hold complex values: kd's own loader refuses it as torch would warn."""
    from safetensors.torch import load_file

    model, _ = original
    torch.save(model.state_dict(), tmp_path / "w.pt")
    run = tmp_path / "r"
    assert kd_here("import", str(tmp_path / "w.pt"), "arch=cnn", *FAST, f"hydra.run.dir={run}", cwd=tmp_path).code == 0
    state = load_file(str(run / "model.safetensors"))
    save_file(
        {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in state.items()}, run / "model.safetensors"
    )
    result = kd_here("evaluate", f"run={run}", *FAST, f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert_one_line_error(result, "another kind of number", "complex64")


def imagenet_stem_resnet18(size: int = 32) -> tuple[torch.nn.Module, torch.Tensor]:
    """What a CIFAR script that calls torchvision.models.resnet18(num_classes=3) trains: the ImageNet stem
    on 32-pixel images (a few steps of a plain loop on random images, so BatchNorm statistics move)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    images = torch.rand(16, 3, size, size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), torch.arange(16) % 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), images


def test_a_torchvision_resnet_with_its_own_stem_on_small_images_is_imported(tmp_path):
    """kd adapts torchvision's stem below 64 px by default; a checkpoint trained with torchvision's own
    stem there fits stem=imagenet, which kd import picks and says; the saved model is that network."""
    from formats import save_image

    from kd_cli.data.images import decode_rgb

    model, _ = imagenet_stem_resnet18()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "cifar_resnet18.pth")
    rng = torch.Generator().manual_seed(0)
    for name in ("a", "b", "c"):
        for i in range(4):
            image = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
            save_image(tmp_path / "photos" / part_of(i) / name / f"{i}.png", image)
    run = tmp_path / "r"
    data = [
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'photos'}",
        "dataset.image_size=32",
        "dataset.crop_fraction=1",
    ]
    result = kd_here(
        "import",
        str(tmp_path / "cifar_resnet18.pth"),
        "arch=resnet18",
        *data,
        *FAST,
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    assert "fits resnet18 with stem=imagenet" in (run / "import.log").read_text()
    assert json.loads((run / "model.json").read_text())["kwargs"]["stem"] == "imagenet"
    saved, spec = load_model(run)
    image = next((tmp_path / "photos" / "test" / "a").glob("*.png"))
    x = (
        (decode_rgb(str(image)).float() / 255 - torch.tensor(spec.mean).view(3, 1, 1))
        / torch.tensor(spec.std).view(3, 1, 1)
    )[None]
    with torch.no_grad():
        assert torch.allclose(saved(x), model(x), atol=1e-5)
    asked = kd_here(
        "import",
        str(tmp_path / "cifar_resnet18.pth"),
        "arch=resnet18",
        "model.kwargs.stem=small",
        *data,
        *FAST,
        f"hydra.run.dir={tmp_path / 'r2'}",
        cwd=tmp_path,
    )
    assert_one_line_error(asked, "conv1.weight [64, 3, 7, 7] vs [64, 3, 3, 3]")


def part_of(index: int) -> str:
    return "train" if index < 2 else "test"


def test_paths_with_letters_outside_ascii(original, tmp_path):
    """The real command: `kd import données/modèle.pth` and a run folder under ü/ (Hydra's grammar reads
    such values only quoted: kd quotes a plain value for the user)."""
    model, _ = original
    (tmp_path / "données").mkdir()
    torch.save(model.state_dict(), tmp_path / "données" / "modèle.pth")
    run = tmp_path / "ü" / "run"
    result = kd("import", "données/modèle.pth", "arch=cnn", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert summary(run)["status"] == "complete" and summary(run)["source"].endswith("données/modèle.pth")


def test_a_fifo_source_is_named_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "weights.pt")
    result = kd_here(
        "import", str(tmp_path / "weights.pt"), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    assert_one_line_error(result, "weights.pt is not a regular file")


@pytest.mark.parametrize("layout", ["sparse", "meta"])
def test_sparse_or_meta_tensors_are_refused_in_one_line(original, tmp_path, layout):
    model, _ = original
    convert = (lambda v: v.to_sparse()) if layout == "sparse" else (lambda v: torch.empty(v.shape, device="meta"))
    torch.save(
        {k: convert(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}, tmp_path / "w.pt"
    )
    result = kd_here(
        "import", str(tmp_path / "w.pt"), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    assert_one_line_error(result, "cannot take as they were trained", layout)


@pytest.mark.parametrize(
    "name", ["epoch=9-step=1000.ckpt", "br[ack]et.pt", "brace{a}.pt", "com,ma.pt", "-dash.pt", "${oc.env:HOME}.pt"]
)
def test_checkpoint_names_with_hydras_characters_are_taken_as_they_are(original, tmp_path, name):
    """Lightning's `epoch=9-step=1000.ckpt`, brackets, braces, commas, a leading dash: the positional
    path is the checkpoint, quoted for Hydra (its grammar read them as overrides, sweeps or flags)."""
    model, _ = original
    torch.save(model.state_dict(), tmp_path / name)
    run = tmp_path / "run"
    result = kd_here("import", name, "arch=cnn", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert summary(run)["source"] == str(tmp_path / name)


def test_two_checkpoints_are_one_line(original, tmp_path):
    model, _ = original
    for name in ("a.pt", "b.pt"):
        torch.save(model.state_dict(), tmp_path / name)
    assert_one_line_error(
        kd_here("import", "a.pt", "b.pt", "arch=cnn", cwd=tmp_path), "takes one checkpoint", "a.pt", "b.pt"
    )


def torchvision_checkpoint(arch: str, path: Path, **changes) -> torch.nn.Module:
    """A plain torchvision classifier for 3 classes saved by a script (no kd), in eval mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=3).eval()
    state = {k: v for k, v in model.state_dict().items() if not (changes.get("drop_counters") and "num_batches" in k)}
    torch.save(state, path)
    return model


SYNTHETIC_32 = ["dataset=synthetic", "dataset.num_classes=3", "dataset.num_train=30", "dataset.num_test=9"]


def test_a_stem_the_weights_cannot_tell_apart_is_asked_for_not_guessed(tmp_path):
    """mobilenet_v3_small's stem is a 3x3 conv in both layouts (stride 2 in torchvision's, 1 in kd's small
    one): the weights fit both, so kd import asks which, instead of importing a network that computes
    otherwise (it did, in silence); with the stem given, the outputs are torchvision's own."""
    original = torchvision_checkpoint("mobilenet_v3_small", tmp_path / "m.pth")
    args = ["m.pth", "arch=mobilenet_v3_small", *SYNTHETIC_32, *FAST]
    asked = kd_here("import", *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_one_line_error(asked, "layouts that compute differently", "model.kwargs.stem=imagenet")
    run = tmp_path / "r2"
    assert kd_here("import", *args, "model.kwargs.stem=imagenet", f"hydra.run.dir={run}", cwd=tmp_path).code == 0
    saved, _ = load_model(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(saved(x), original(x), atol=1e-5)


def test_torchvision_head_names_and_absent_step_counters_fit(tmp_path):
    """torchvision's mobilenet_v2 names its head `classifier.1` (kd's adapted network `classifier.head.1`), and
    older checkpoints have no BatchNorm step counters: both import, as torch's own loading takes them."""
    original = torchvision_checkpoint("mobilenet_v2", tmp_path / "m.pth", drop_counters=True)
    run = tmp_path / "r"
    args = ["m.pth", "arch=mobilenet_v2", "model.kwargs.stem=imagenet", *SYNTHETIC_32, *FAST]
    result = kd_here("import", *args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.code == 0, result.stderr
    saved, _ = load_model(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(saved(x), original(x), atol=1e-5)


def test_key_names_with_newlines_stay_on_one_line(original, tmp_path):
    model, _ = original
    torch.save({k + "\n": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    result = kd_here(
        "import", str(tmp_path / "w.pt"), "arch=cnn", *FAST, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path
    )
    assert_one_line_error(result, "missing", "\\n")


# ---------------------------------------------------------------- segmenters

SCENES = ["dataset=digit_scenes", "dataset.train_scenes=40", "dataset.test_scenes=20", *FAST]


def trained_segmenter(steps: int = 20) -> torch.nn.Module:
    """kd's segcnn_tiny trained a few steps on digit scenes by a plain PyTorch loop (someone else's code)."""
    torch.manual_seed(0)
    model = create_model("segcnn_tiny", 11, 1, 48)
    data = load_dataset({"name": "digit_scenes", "train_scenes": 40, "test_scenes": 20})
    x = data.train.images.float() / 255
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        index = torch.arange(step * 8, step * 8 + 8) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[index]), data.train.labels[index].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_a_segmenter_is_imported_scored_by_miou_and_kd_evaluate_agrees(tmp_path):
    torch.save(trained_segmenter().state_dict(), tmp_path / "segmenter.pth")
    run = tmp_path / "imported"
    kd_here_ok("import", "segmenter.pth", "arch=segcnn_tiny", *SCENES, f"hydra.run.dir={run}", cwd=tmp_path)
    done = summary(run)
    assert done["task"] == "segmentation" and done["metric"] == "miou" and "top1" not in done
    assert done["best_miou"] == done["last_miou"] == done["miou"] > 0
    evaluated = tmp_path / "evaluated"
    kd_here_ok("evaluate", f"run={run}", "latency_batches=1", *FAST, f"hydra.run.dir={evaluated}", cwd=tmp_path)
    assert summary(evaluated)["miou"] == pytest.approx(done["miou"], abs=1e-6)


@pytest.mark.parametrize("aux_loss", [True, False])
def test_a_torchvision_segmenter_is_imported_with_or_without_its_aux_head_as_saved(tmp_path, aux_loss):
    """torchvision's own keys (no kd wrapper); the aux head's weights present or not: the layout that fits."""
    torch.manual_seed(0)
    model = create_model("deeplabv3_mobilenet_v3_large", 11, 1, 48, aux_loss=aux_loss)
    torch.save(model.net.state_dict(), tmp_path / "deeplab.pth")
    run = tmp_path / "imported"
    arch = "arch=deeplabv3_mobilenet_v3_large"
    kd_here_ok("import", "deeplab.pth", arch, *SCENES, f"hydra.run.dir={run}", cwd=tmp_path)
    assert json.loads((run / "model.json").read_text())["kwargs"]["aux_loss"] is aux_loss
    imported, _ = load_model(run)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(imported.eval()(x), model.eval()(x), atol=1e-5)


def test_a_classifier_checkpoint_on_a_segmentation_set_is_one_line(tmp_path):
    torch.save(trained_cnn(steps=1).state_dict(), tmp_path / "cnn.pth")
    result = kd_here("import", "cnn.pth", "arch=cnn", *SCENES, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_one_line_error(result, "model.arch=cnn is a classification model", "segmentation")
    assert not (tmp_path / "r").exists()
