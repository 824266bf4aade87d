"""`kd compress`: every step through the CLI on real digits, reload through `kd evaluate`, the
structural save/load across the model zoo, the int8 file format, and one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok, kd_ok, summary
from safetensors import safe_open

from kd_cli.compress import build_step
from kd_cli.compress.context import StepContext
from kd_cli.compress.lowrank import factorise
from kd_cli.compress.qstate import decode, encode
from kd_cli.engine.artifacts import ModelSpec, load_model, save_model
from kd_cli.stages.models import count_parameters

PRUNE = dict(
    ratio=0.5,
    importance="magnitude",
    scope="uniform",
    ignored_layers=[],
    iterative_steps=1,
    round_to=None,
    max_layer_ratio=0.9,
    taylor_batches=1,
)
LOWRANK = dict(rank_ratio=0.5, energy=None, layers="all", skip=[])
INT8 = dict(mode="static", backend="x86", calibration_batches=2, layers=[], skip=[])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A cnn trained on the real digits (the model every CLI test compresses)."""
    root = tmp_path_factory.mktemp("compress")
    run = root / "teacher"
    kd_ok("train-teacher", "teacher=cnn", "trainer.epochs=8", *FAST, f"hydra.run.dir={run}", cwd=root)
    return run


def compress(teacher: Path, tmp_path: Path, *overrides: str, process: bool = False) -> tuple[Path, dict]:
    """`kd compress` of the teacher: in this process (the teacher's training and the interrupted recovery
    below are this file's real processes), or in one of its own where the test says so."""
    run = tmp_path / "compressed"
    (kd_ok if process else kd_here_ok)(
        "compress",
        f"run={teacher}",
        "trainer.epochs=4",
        "latency_batches=3",
        *FAST,
        *overrides,
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    return run, summary(run)


def evaluate_top1(run: Path, tmp_path: Path) -> dict:
    out = tmp_path / "evaluated"
    args = ["evaluate", f"run={run}", "latency_batches=2", "trainer.num_workers=0", f"hydra.run.dir={out}"]
    kd_here_ok(*args, cwd=tmp_path)
    return summary(out)


def test_prune_structured_halves_params_and_macs_and_reloads(teacher, tmp_path):
    run, s = compress(teacher, tmp_path, "compression=prune_structured")
    assert s["status"] == "complete" and s["steps"] == ["prune_structured", "finetune"]
    assert s["params_ratio"] <= 0.5 and s["macs_ratio"] <= 0.5, s
    pruned, recovered = s["rows"][1]["top1"], s["rows"][2]["top1"]
    assert recovered > pruned and s["top1_drop"] <= 5.0, s  # 4 epochs here; the 1-point bar: test_compress_bars.py
    layers = json.loads((run / "model.json").read_text())["extra"]["transforms"][0]["layers"]
    assert layers["stages.0.0.0"]["attrs"]["out_channels"] == 16  # 32 channels, half removed
    assert "fc" not in layers or layers["fc"]["attrs"]["out_features"] == 10  # the classifier keeps its classes
    evaluated = evaluate_top1(run, tmp_path)
    assert evaluated["top1"] == pytest.approx(s["last_top1"], abs=1e-9)
    assert evaluated["params"] == s["params"]
    rows = (run / "compression.csv").read_text().splitlines()
    assert rows[0].startswith("step,params,macs,size_bytes,sparsity,top1,latency_b1_ms,latency_b64_ms")
    assert [r.split(",")[0] for r in rows[1:]] == ["original", "prune_structured", "+ finetune (kd)"]


def test_int8_file_is_small_loads_without_pickle_and_scores_the_same(teacher, tmp_path):
    run, s = compress(teacher, tmp_path, "compression=quantize_int8")
    assert s["size_ratio"] <= 0.3, s
    assert abs(s["top1_drop"]) <= 1.0, s
    assert s["speedup_b64"] is not None, s  # measured and reported; never asserted (a busy machine is slower)
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert torch.int8 in dtypes and "kd_layout" in f.metadata()
    evaluated = evaluate_top1(run, tmp_path)
    assert evaluated["top1"] == pytest.approx(s["last_top1"], abs=1e-9)
    assert evaluated["macs"] == s["compressed"]["macs"] > 0
    assert (run / "float" / "model.safetensors").exists()  # the float model, for ONNX export
    # an int8 model teaches logit methods (through the teacher cache: its identity hashes the saved form);
    # a feature method, which reads layers the int8 graph no longer names, is one line before any work
    student = ["student=cnn", "student.kwargs.width=4", "trainer.epochs=1", *FAST]
    taught = kd_here_ok(
        "distill", f"teacher.checkpoint={run}", *student, f"hydra.run.dir={tmp_path / 'd'}", cwd=tmp_path
    )
    assert summary(tmp_path / "d")["status"] == "complete", taught.stderr
    refused = kd_here(
        "distill", f"teacher.checkpoint={run}", "method=at", *student, f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path
    )
    assert_one_line_error(refused, "no layers a feature method can read", "use the uncompressed model")
    assert not (tmp_path / "e").exists()


def test_lowrank_lowers_params_and_reloads(teacher, tmp_path):
    run, s = compress(teacher, tmp_path, "compression=lowrank")
    assert s["params_ratio"] < 0.8, s
    assert s["rows"][2]["top1"] > s["rows"][1]["top1"] - 0.5 and s["top1_drop"] <= 5.0, s
    ranks = json.loads((run / "model.json").read_text())["extra"]["transforms"][0]["ranks"]
    assert ranks and all(r >= 1 for r in ranks.values())
    assert evaluate_top1(run, tmp_path)["top1"] == pytest.approx(s["last_top1"], abs=1e-9)


def test_unstructured_sparsity_survives_recovery_but_not_the_file_size(teacher, tmp_path):
    run, s = compress(
        teacher, tmp_path, "compression=prune_unstructured", "compression.prune_unstructured.sparsity=0.6"
    )
    assert 59.0 <= s["compressed"]["sparsity"] <= 61.0, s  # the masks held through finetuning
    assert s["size_ratio"] > 0.95, s  # a dense file of zeros is no smaller: reported, not hidden
    model, _ = load_model(run)
    weights = torch.cat(
        [m.weight.flatten() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    )
    assert (weights == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)


def test_prune_then_quantize_lists_every_step(teacher, tmp_path):
    run, s = compress(teacher, tmp_path, "compression=prune_quantize", "method=dkd")
    assert [r["step"] for r in s["rows"]] == ["original", "prune_structured", "+ finetune (dkd)", "quantize_int8"]
    assert s["size_ratio"] < 0.15 and s["params_ratio"] <= 0.5, s
    assert evaluate_top1(run, tmp_path)["top1"] == pytest.approx(s["last_top1"], abs=1e-9)
    float_model, float_spec = load_model(run / "float")  # pruned, float: what ONNX export takes
    assert float_spec.extra["transforms"][0]["kind"] == "prune_structured"
    assert count_parameters(float_model) < 0.5 * s["original"]["params"]
    exported = tmp_path / "onnx"
    assert kd_here("export", f"run={run / 'float'}", "format=onnx", f"hydra.run.dir={exported}", cwd=tmp_path).code == 0
    assert summary(exported)["check_inputs"] == "digits test images" and summary(exported)["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            ["compression.prune_structured.ratio=1.0"],
            ["compression.prune_structured.ratio=1.0 must be a number in (0, 1)"],
        ),
        (["compression=quantize_int8", "compression.quantize_int8.layers=[stages.0.0.1]"], ["BatchNorm2d", "int8"]),
        (["compression.steps=[quantize_int8,finetune]"], ["quantize_int8 must be the last step"]),
        (["compression.steps=[prune,finetune]"], ["unknown step 'prune'"]),
        (["compression.prune_structured.importance=l1"], ["importance='l1' must be one of magnitude, bn_scale"]),
        (["compression.prune_structured.ignored_layers=[nope]"], ["no layer 'nope'"]),
        (["compression.prune_structured.ratio=half"], ["ratio"]),
    ],
)
def test_impossible_requests_are_one_line_errors_and_nothing_is_complete(teacher, tmp_path, overrides, fragments):
    run = tmp_path / "bad"
    result = kd_here(
        "compress", f"run={teacher}", "trainer.epochs=1", *FAST, *overrides, f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert_one_line_error(result, *fragments)
    assert not (run / "model.safetensors").exists()
    assert not (run / "summary.json").exists() or summary(run)["status"] != "complete"


def test_a_run_directory_without_a_model_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = kd_here("compress", f"run={tmp_path / 'empty'}", *FAST, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(result, "no model.safetensors")


# --- the structure survives save/load across the model zoo (no CLI: one model per case) ---

ZOO = ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2", "resnet18", "mobilenet_v3_small", "mlp"]


def zoo_spec(arch: str) -> ModelSpec:
    return ModelSpec(arch, {}, 10, 3, 32, [0.5] * 3, [0.5] * 3, [str(i) for i in range(10)], "synthetic")


def compressed_and_reloaded(arch: str, step: str, options: dict, tmp_path: Path):
    torch.manual_seed(0)
    spec = zoo_spec(arch)
    model = spec.build().eval()
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))] * 2
    ctx = StepContext(torch.zeros(1, 3, 32, 32), data, torch.nn.functional.cross_entropy)
    compressed = build_step(step, options).apply(copy.deepcopy(model), ctx).eval()
    save_model(tmp_path, compressed, ModelSpec(**{**spec.__dict__, "extra": {"transforms": ctx.transforms}}))
    return model, compressed, load_model(tmp_path)[0]


@pytest.mark.parametrize("arch", ZOO)
@pytest.mark.parametrize("step, options", [("prune_structured", PRUNE), ("lowrank", LOWRANK)])
def test_pruned_and_factorised_models_rebuild_from_model_json(arch, step, options, tmp_path):
    model, compressed, reloaded = compressed_and_reloaded(arch, step, options, tmp_path)
    x = torch.randn(3, 3, 32, 32)
    assert count_parameters(compressed) < 0.7 * count_parameters(model)
    assert count_parameters(reloaded) == count_parameters(compressed)
    assert torch.equal(reloaded(x), compressed(x))


@pytest.mark.parametrize("arch", ["resnet8", "mobilenetv2", "shufflenetv2", "mlp"])
def test_int8_models_rebuild_bit_exactly(arch, tmp_path):
    model, compressed, reloaded = compressed_and_reloaded(arch, "quantize_int8", INT8, tmp_path)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(reloaded(x), compressed(x))
    save_model(tmp_path / "float", model, zoo_spec(arch))
    int8_bytes, float_bytes = ((d / "model.safetensors").stat().st_size for d in (tmp_path, tmp_path / "float"))
    assert int8_bytes <= 0.3 * float_bytes


def test_shufflenet_channel_pruning_is_refused_in_one_line(tmp_path):
    with pytest.raises(Exception, match="Torch-Pruning cannot prune"):
        compressed_and_reloaded("shufflenetv2", "prune_structured", PRUNE, tmp_path)


def test_full_rank_factorisation_reproduces_the_layer():
    torch.manual_seed(0)
    for layer, x in [
        (torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
        (torch.nn.Linear(12, 5), torch.randn(4, 12)),
    ]:
        matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        pair = factorise(layer, min(matrix.shape), torch.linalg.svd(matrix, full_matrices=False))
        assert torch.allclose(pair(x), layer(x), atol=1e-5)


def test_energy_picks_the_smallest_rank_keeping_that_energy():
    step = build_step("lowrank", {**LOWRANK, "energy": 0.9})
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22: 16/22 = .73, 20/22 = .91
    assert step._rank(s) == 2


def test_quantized_state_round_trips_through_plain_tensors():
    w = torch.randn(4, 3)
    state = {
        "per_channel": torch.quantize_per_channel(
            w, torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), 0, torch.qint8
        ),
        "per_tensor": torch.quantize_per_tensor(w, 0.05, 3, torch.quint8),
        "packed": (torch.quantize_per_tensor(w, 0.1, 0, torch.qint8), torch.randn(4)),
        "dtype": torch.qint8,
        "nothing": None,
        "plain": torch.arange(3),
    }
    tensors, layout = encode(state)
    assert all(not t.is_quantized for t in tensors.values())
    back = decode(tensors, layout)
    for key in ("per_channel", "per_tensor"):
        assert torch.equal(back[key].int_repr(), state[key].int_repr()) and back[key].qscheme() == state[key].qscheme()
        assert torch.equal(back[key].dequantize(), state[key].dequantize())
    assert torch.equal(back["packed"][0].dequantize(), state["packed"][0].dequantize())
    assert back["dtype"] is torch.qint8 and back["nothing"] is None and torch.equal(back["plain"], state["plain"])


def test_interrupted_recovery_resumes_to_the_uninterrupted_result(teacher, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = ["compress", f"run={teacher}", "trainer.epochs=12", "latency_batches=2", *FAST]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert kd_here(*args, f"hydra.run.dir={whole}", cwd=tmp_path).code == 0  # in this process: the same numbers
    process = subprocess.Popen(
        [sys.executable, "-m", "kd_cli", *args, f"hydra.run.dir={broken}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (broken / "checkpoints/last.pt").exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "resume=" in stderr and "Traceback" not in stderr
    assert summary(broken)["status"] == "interrupted" and not (broken / "model.safetensors").exists()
    resumed = kd_here("compress", f"resume={broken}", cwd=tmp_path)  # prunes again (deterministic), resumes recovery
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert summary(broken)["last_top1"] == summary(whole)["last_top1"]
    assert (broken / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_tampered_compressed_model_json_is_a_one_line_error(teacher, tmp_path):
    run, _ = compress(teacher, tmp_path, "compression=lowrank", "trainer.epochs=1")
    meta = json.loads((run / "model.json").read_text())
    meta["extra"]["transforms"][0]["ranks"] = {"no.such.layer": 3}
    (run / "model.json").write_text(json.dumps(meta))
    assert_one_line_error(kd_here("evaluate", f"run={run}", cwd=tmp_path), "model.json")


def test_recovery_epochs_and_the_compressed_model_reach_the_tracker(teacher, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = f"paths.outputs={tmp_path / 'out'}"
    run, _ = compress(teacher, tmp_path, "logger=mlflow", "trainer.epochs=2", out, process=True)  # mlflow's globals
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    [tracked] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert tracked.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "test_top1")] == [1, 2]
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "model")} >= {"model/model.safetensors"}


@pytest.mark.parametrize(
    "options",
    [
        {"importance": "taylor", "taylor_batches": 2},
        {"importance": "bn_scale"},
        {"scope": "global", "ratio": 0.4},
        {"iterative_steps": 3},
        {"round_to": 8},
    ],
)
def test_pruning_criteria_and_schedules_shrink_and_rebuild(options, tmp_path):
    model, compressed, reloaded = compressed_and_reloaded(
        "resnet8x4", "prune_structured", {**PRUNE, **options}, tmp_path
    )
    x = torch.randn(2, 3, 32, 32)
    assert count_parameters(compressed) < 0.8 * count_parameters(model)
    assert torch.equal(reloaded(x), compressed(x))
    if options.get("round_to"):
        widths = [m.out_channels for m in compressed.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w % 8 == 0 for w in widths), widths


def test_bn_scale_needs_batchnorm(tmp_path):
    with pytest.raises(Exception, match="bn_scale needs BatchNorm"):
        compressed_and_reloaded("mlp", "prune_structured", {**PRUNE, "importance": "bn_scale"}, tmp_path)


def test_taylor_scores_differ_from_magnitude(tmp_path):
    """Taylor importance uses the training gradients: it keeps other channels than magnitude does."""
    kept = {}
    for importance in ("magnitude", "taylor"):
        _, compressed, _ = compressed_and_reloaded(
            "cnn", "prune_structured", {**PRUNE, "importance": importance}, tmp_path / importance
        )
        kept[importance] = compressed.stages[0][0][0].weight.detach().clone()
    assert kept["magnitude"].shape == kept["taylor"].shape and not torch.equal(kept["magnitude"], kept["taylor"])
