"""`kd export`: ONNX and TorchScript files that reload and match PyTorch (checked here independently of
the stage's own check: onnxruntime / torch.jit.load against the model rebuilt by load_model), a dynamic
batch, model.json travelling with the file, several model families, int8 models, and one-line errors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from kdrun import assert_one_line_error, kd_here, kd_here_ok, kd_ok, summary
from omegaconf import OmegaConf

from kd_cli.engine.artifacts import ModelSpec, load_model, save_model
from kd_cli.engine.rundir import RunDir
from kd_cli.errors import KdError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DIGITS = {"name": "digits", "test_fraction": 0.3, "split_seed": 0, "mean": [0.3053], "std": [0.3759]}
TOLERANCE = 1e-4


def saved_model(directory: Path, arch: str, kwargs: dict, channels: int, size: int, dataset: str = "digits") -> Path:
    """A registry model with random weights and random BatchNorm statistics (so BN folding in the
    exporters matters), saved as a run directory holds it: model.safetensors + model.json."""
    torch.manual_seed(0)
    spec = ModelSpec(
        arch, kwargs, 10, channels, size, [0.5] * channels, [0.25] * channels, [str(i) for i in range(10)], dataset
    )
    if dataset == "digits":
        spec.mean, spec.std = DIGITS["mean"], DIGITS["std"]
    model = spec.build().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    save_model(directory, model, spec)
    return directory


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A cnn for the real digits, with the config_resolved.yaml a run directory has (its data set)."""
    run = saved_model(
        tmp_path_factory.mktemp("digits") / "teacher", "cnn", {"width": 8, "depth": 2, "dropout": 0.0}, 1, 8
    )
    (run / "config_resolved.yaml").write_text(OmegaConf.to_yaml({"stage": "train-teacher", "dataset": DIGITS}))
    return run


def digits_test_images(count: int, offset: int = 0) -> torch.Tensor:
    """Real digits test images, normalised here by hand as model.json says (not through kd's loader)."""
    from kd_cli.data import load_dataset

    images = load_dataset(DIGITS).test.images[offset : offset + count].float() / 255.0
    return (images - DIGITS["mean"][0]) / DIGITS["std"][0]


def pytorch_outputs(run: Path, images: torch.Tensor) -> np.ndarray:
    model, _ = load_model(run)
    with torch.no_grad():
        return model(images).numpy()


def export(run: Path, out: Path, *overrides: str) -> dict:
    kd_here_ok("export", f"run={run}", *overrides, f"hydra.run.dir={out}", cwd=out.parent)
    return summary(out)


def test_onnx_export_matches_pytorch_in_onnxruntime_at_two_batch_sizes(digits_run, tmp_path):
    s = export(digits_run, tmp_path / "onnx")
    assert s["status"] == "complete" and s["format"] == "onnx" and s["opset"] == 18 and s["dynamic_batch"] is True
    assert s["check_inputs"] == "digits test images" and s["check_batch_sizes"] == [8, 1]
    assert 0 <= s["max_abs_diff"] <= TOLERANCE
    path = tmp_path / "onnx" / "model.onnx"
    assert s["size_bytes"] == path.stat().st_size
    # model.json travels with the file: copied beside it and embedded in its metadata
    meta = (digits_run / "model.json").read_text()
    assert (tmp_path / "onnx" / "model.json").read_text() == meta
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["model.json"] == meta
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert isinstance(given.shape[0], str) and given.shape[1:] == [1, 8, 8]  # symbolic batch
    for batch, offset in ((16, 0), (3, 100)):  # sizes the stage did not check
        images = digits_test_images(batch, offset)
        got = session.run([returned.name], {given.name: images.numpy()})[0]
        expected = pytorch_outputs(digits_run, images)
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= TOLERANCE
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_torchscript_export_reloads_and_matches(digits_run, tmp_path):
    s = export(digits_run, tmp_path / "ts", "format=torchscript")
    assert s["status"] == "complete" and s["format"] == "torchscript" and s["opset"] is None
    assert s["max_abs_diff"] <= TOLERANCE
    extra = {"model.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit warns that it is deprecated
        loaded = torch.jit.load(str(tmp_path / "ts" / "model.pt"), _extra_files=extra)
    assert extra["model.json"].decode() == (digits_run / "model.json").read_text()
    for batch in (5, 1):
        images = digits_test_images(batch, 200)
        with torch.no_grad():
            got = loaded(images).numpy()
        assert np.abs(got - pytorch_outputs(digits_run, images)).max() <= TOLERANCE


def stage_config(run: Path, **overrides) -> OmegaConf:
    """The shipped configs/export.yaml (its defaults), with overrides: the stage called in-process."""
    cfg = OmegaConf.load(CONFIGS / "export.yaml")
    cfg.pop("defaults")
    return OmegaConf.merge(
        cfg, {"seed": 0, "paths": {"outputs": "outputs", "data": "data"}, "run": str(run)}, overrides
    )


ARCHS = [
    ("mlp", {"hidden": [16]}, 1, 8, 20),  # and an opset above the exporter's own 18 (converted)
    ("resnet8", {}, 3, 16, 18),
    ("wrn_16_2", {"dropout": 0.0}, 3, 16, 18),
    ("mobilenetv2", {"width_mult": 0.25, "expansion": 2}, 3, 16, 18),
    ("resnet18", {"pretrained": False}, 3, 16, 18),  # a torchvision adapter
]


@pytest.mark.parametrize("arch, kwargs, channels, size, opset", ARCHS, ids=[a[0] for a in ARCHS])
def test_model_families_export_to_onnx_and_match(arch, kwargs, channels, size, opset, tmp_path):
    from kd_cli.stages.export import main

    run = saved_model(tmp_path / "model", arch, kwargs, channels, size, dataset="synthetic")
    out = RunDir(tmp_path / "export")
    main(stage_config(run, check_batch_size=4, opset=opset), out)
    s = summary(out.path)
    assert s["status"] == "complete" and s["check_inputs"] == "random normal inputs", s
    assert s["opset"] == opset and s["check_batch_sizes"] == [4, 1]
    session = ort.InferenceSession(str(out.path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(6, channels, size, size, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    diff = float(np.abs(got - pytorch_outputs(run, images)).max())
    print(f"{arch}: stage {s['max_abs_diff']:.2e}, independent {diff:.2e}")
    assert diff <= TOLERANCE and s["max_abs_diff"] <= TOLERANCE


def test_int8_model_exports_to_torchscript_but_not_onnx(tmp_path):
    from kd_cli.compress import build_step, is_int8
    from kd_cli.compress.context import StepContext
    from kd_cli.stages.export import main

    run = saved_model(tmp_path / "float", "cnn", {"width": 8, "depth": 2, "dropout": 0.0}, 1, 8)
    model, spec = load_model(run)
    data = [(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))] * 2
    ctx = StepContext(torch.zeros(1, 1, 8, 8), data, torch.nn.functional.cross_entropy)
    options = dict(mode="static", backend="x86", calibration_batches=2, layers=[], skip=[])
    int8 = build_step("quantize_int8", options).apply(model, ctx)
    int8_spec = ModelSpec(**{**spec.__dict__, "extra": {"transforms": ctx.transforms}})
    save_model(tmp_path / "int8", int8, int8_spec)
    assert is_int8(int8_spec.extra) and not is_int8(spec.extra)

    out = RunDir(tmp_path / "ts")
    main(stage_config(tmp_path / "int8", format="torchscript", check_inputs="random"), out)
    s = summary(out.path)
    assert s["status"] == "complete" and s["int8"] is True and s["max_abs_diff"] <= TOLERANCE
    reloaded, _ = load_model(tmp_path / "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(out.path / "model.pt"))
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(images), reloaded(images), atol=TOLERANCE)

    result = kd_here("export", f"run={tmp_path / 'int8'}", f"hydra.run.dir={tmp_path / 'refused'}", cwd=tmp_path)
    assert_one_line_error(result, "ONNX export of int8 models is not supported", f"run={tmp_path / 'int8' / 'float'}")
    assert not (tmp_path / "refused").exists()  # refused before the run started: no run directory at all


def test_a_difference_over_tolerance_fails_and_keeps_no_file(digits_run, tmp_path):
    from kd_cli.stages.export import main

    out = RunDir(tmp_path / "strict")
    with pytest.raises(KdError, match=r"differs from PyTorch by up to .*tolerance=0;"):
        main(stage_config(digits_run, tolerance=0.0), out)  # ONNX Runtime's and PyTorch's kernels differ a little
    assert not (out.path / "model.onnx").exists() and not (out.path / "model.json").exists()
    assert not list(out.path.glob(".model.onnx*"))  # nor its temporary file


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"opset": 13}, "opset=13: torch's ONNX exporter writes opset 18 or newer"),
        ({"check_batch_size": 1}, "check_batch_size=1: a dynamic batch is traced from a batch of at least 2"),
        ({"check_inputs": "tests"}, "unknown check_inputs 'tests'"),
        ({"tolerance": -1.0}, "tolerance=-1.0 must be >= 0"),
    ],
)
def test_impossible_options_are_refused_before_any_work(overrides, message, tmp_path):
    from kd_cli.stages.export import main

    out = RunDir(tmp_path / "out")
    with pytest.raises(KdError, match=re.escape(message)):
        main(stage_config(tmp_path / "no-such-model", **overrides), out)
    assert not list(out.path.iterdir())


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # control flow on values: torch.export refuses it


def test_a_model_torch_export_refuses_is_one_line_with_the_report_in_a_file(tmp_path, capfd):
    from kd_cli.stages.export import export_onnx

    with pytest.raises(KdError) as error:
        export_onnx(
            DataDependent().eval(),
            torch.randn(4, 3),
            tmp_path / "model.onnx",
            OmegaConf.create({"dynamic_batch": True, "opset": 18}),
            "{}",
        )
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith("ONNX export failed: GuardOnDataDependentSymNode: Could not guard on data-dependent")
    assert "Failed to export the model with torch.export" in (tmp_path / "onnx_export_error.txt").read_text()
    assert not (tmp_path / "model.onnx").exists()
    printed = capfd.readouterr()
    assert "GraphModule" not in printed.err + printed.out and "forward" not in printed.err + printed.out


def test_nan_outputs_never_pass_the_check():
    from kd_cli.stages.export import compare

    batch = torch.zeros(2, 3)
    result = compare(lambda b: torch.full((2, 3), float("nan")), [batch], [batch])
    assert result["max_abs_diff"] == float("inf")


def test_fixed_batch_onnx_file(digits_run, tmp_path):
    from kd_cli.stages.export import main

    out = RunDir(tmp_path / "fixed")
    main(stage_config(digits_run, dynamic_batch=False, check_batch_size=1), out)
    s = summary(out.path)
    assert s["status"] == "complete" and s["dynamic_batch"] is False and s["check_batch_sizes"] == [1]
    session = ort.InferenceSession(str(out.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 8, 8]


def corrupt(tmp_path: Path, digits_run: Path) -> Path:
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model.json").write_text((digits_run / "model.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    return bad


@pytest.mark.parametrize(
    "case, overrides, fragments",
    [
        ("no model", ["run={tmp}"], ["no model.safetensors in"]),
        ("corrupt", ["run={corrupt}"], ["is corrupt or not a safetensors file"]),
        ("format", ["run={model}", "format=onnxx"], ["unknown format 'onnxx'", "did you mean onnx"]),
    ],
)
def test_bad_input_is_one_line_error(case, overrides, fragments, digits_run, tmp_path):
    paths = {
        "tmp": tmp_path,
        "model": digits_run,
        "corrupt": corrupt(tmp_path, digits_run) if case == "corrupt" else "",
    }
    out = tmp_path / "out"
    result = kd_here("export", *(o.format(**paths) for o in overrides), f"hydra.run.dir={out}", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not out.exists()  # refused before the run started: no run directory to clutter kd report


def test_export_is_listed_and_completed(tmp_path):
    assert "export" in kd_ok(cwd=tmp_path).stdout
    completion = kd_ok("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "kd exp", "COMP_POINT": "6"}).stdout
    assert completion.split() == ["export"]
