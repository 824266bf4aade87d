"""`kd export`: write a saved model (run directory or model.safetensors) as ONNX or TorchScript, then
check the written file against PyTorch on the same inputs before the run counts as complete.

- onnx: torch.onnx.export with the torch.export-based exporter (`dynamo=True`, torch's default and
  the one maintained; the TorchScript-based one is deprecated), the batch dimension symbolic
  (`dynamic_shapes`), the file checked in onnxruntime on the CPU.
- torchscript: torch.jit.trace + torch.jit.save, the file checked after torch.jit.load. torch.jit warns
  that it is deprecated (a FutureWarning on every call in torch 2.14); only that warning is silenced.

The file is written under a temporary name, checked there, and renamed only when its outputs match
PyTorch's within `tolerance` at `check_batch_size` and (dynamic batch) at a batch of 1. model.json is
copied beside it and also embedded in the file (ONNX metadata / TorchScript extra file `model.json`),
so the input normalisation, class names and input size travel with the model.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from kd_cli.compress import is_int8
from kd_cli.engine.artifacts import (
    META,
    ModelSpec,
    load_model,
    load_spec,
    resolve_weights,
)
from kd_cli.engine.device import seed_everything
from kd_cli.engine.files import atomic_write
from kd_cli.engine.rundir import COMPLETE, RunDir
from kd_cli.errors import KdError, unknown_choice
from kd_cli.models.registry import model_task
from kd_cli.registry import Range, check_number
from kd_cli.stages import export_boxes
from kd_cli.stages.data import saved_dataset
from kd_cli.stages.export_common import METADATA_KEY, exporter_output, first_line
from kd_cli.stages.lifecycle import start_run
from kd_cli.stages.results import print_results

log = logging.getLogger("kd")

FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
CHECK_INPUTS = ("auto", "random")
MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 and newer (it keeps 18 for lower requests)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_REPORT = "onnx_export_error.txt"  # the exporter's full report when it fails


def main(cfg: DictConfig, run: RunDir) -> float:
    check_export_options(cfg)
    started = time.time()
    seed_everything(cfg.seed)
    weights = resolve_weights(cfg.run)
    spec = load_spec(weights)
    detector = model_task(spec.arch) == "detection"
    if detector:
        export_boxes.check_options(cfg)
    if cfg.format == "onnx" and is_int8(spec.extra):
        raise KdError(
            f"ONNX export of int8 models is not supported ({weights} holds int8 weights); export the "
            f"float model instead: kd export run={weights.parent / 'float'} format=onnx "
            f"(or format=torchscript for the int8 model)"
        )
    model, spec = load_model(weights, "cpu")
    batches, source = check_batches(cfg, spec, weights)
    start_run(cfg, run, None, device="cpu", seed=cfg.seed, model=str(weights), **_versions(cfg.format))
    log.info(f"export: format {cfg.format}")
    meta_text = weights.with_name(META).read_text()
    path = run.path / FILES[cfg.format]
    if detector:  # one image per file run (stages/export_boxes.py)
        result = export_boxes.write_checked(model, torch.cat(batches), source, path, cfg, meta_text)
    else:
        result = write_checked(model, batches, source, path, cfg, meta_text)
    atomic_write(run.path / META, lambda tmp: tmp.write_text(meta_text))
    summary = {
        "stage": "export",
        "model": str(weights),
        "arch": spec.arch,
        "dataset": spec.dataset,
        "format": cfg.format,
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "exporter": _exporter(cfg, detector),
        "opset": onnx_opset(path) if cfg.format == "onnx" else None,
        "dynamic_batch": cfg.dynamic_batch and not detector,
        "int8": is_int8(spec.extra),
        "check_runtime": "onnxruntime CPUExecutionProvider" if cfg.format == "onnx" else "torch.jit.load",
        "check_inputs": source,
        "check_batch_sizes": [1] if detector else [len(b) for b in batches],
        **result,
        "tolerance": cfg.tolerance,
    }
    run.write_summary(COMPLETE, **summary, wall_time_s=time.time() - started)
    kind = f"onnx (opset {summary['opset']})" if cfg.format == "onnx" else "torchscript"
    rows = [("format", kind), ("file", path.name), ("size on disk (bytes)", summary["size_bytes"])]
    if detector:
        rows += [
            ("input", "one image per run"),
            ("checked on", f"{result['images_checked']} {source} ({result['boxes_checked']} boxes)"),
            ("max box difference (pixels)", f"{result['max_box_diff']:.2e}"),
            ("max score difference", f"{result['max_abs_diff']:.2e}"),
            ("tolerances (box, score)", f"{cfg.box_tolerance:.0e}, {cfg.tolerance:.0e}"),
        ]
    else:
        rows += [
            ("dynamic batch", _batch_label(cfg)),
            ("checked on", source),
            ("batch sizes checked", ", ".join(map(str, summary["check_batch_sizes"]))),
            ("max abs difference", f"{result['max_abs_diff']:.2e}"),
            ("same class (argmax) %", result["argmax_agreement"]),
            ("tolerance", f"{cfg.tolerance:.0e}"),
        ]
    print_results(f"export {spec.arch} ({spec.dataset}) to {cfg.format}", rows, run.path)
    return result["max_abs_diff"]


def write_checked(
    model: nn.Module, batches: list[torch.Tensor], source: str, path: Path, cfg: DictConfig, meta_text: str
) -> dict:
    """Export to a temporary file, run it on `batches`, and rename it to `path` only if it matches."""
    with torch.no_grad():
        expected = [model(batch) for batch in batches]
    exporter, runner = (export_onnx, onnx_runner) if cfg.format == "onnx" else (export_torchscript, torchscript_runner)
    result: dict = {}

    def write_and_check(tmp: Path) -> None:
        exporter(model, batches[0], tmp, cfg, meta_text)
        result.update(compare(runner(tmp), batches, expected))
        if result["max_abs_diff"] > cfg.tolerance:
            raise KdError(
                f"the exported {cfg.format} file differs from PyTorch by up to {result['max_abs_diff']:.3g} "
                f"(tolerance={cfg.tolerance:g}; outputs reach {result['max_abs_output']:.3g}) on {source}; "
                f"nothing was kept. Raise tolerance= if that difference is acceptable"
            )

    atomic_write(path, write_and_check)
    return result


def _exporter(cfg: DictConfig, detector: bool) -> str:
    if cfg.format != "onnx":
        return "torch.jit.trace"
    return export_boxes.EXPORTER if detector else "torch.onnx.export(dynamo=True)"


def _batch_label(cfg: DictConfig) -> str:
    if cfg.dynamic_batch:
        return "yes (checked at two sizes)"
    return f"no (fixed at {cfg.check_batch_size})" if cfg.format == "onnx" else "not checked"


MAX_CHECK_BATCH = 4096


def newest_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_export_options(cfg: DictConfig) -> None:
    """Impossible values, found before anything is read or written."""
    if cfg.format not in FILES:
        raise unknown_choice("format", cfg.format, FILES)
    if cfg.check_inputs not in CHECK_INPUTS:
        raise unknown_choice("check_inputs", cfg.check_inputs, CHECK_INPUTS)
    if cfg.format == "onnx" and cfg.opset < MIN_OPSET:
        raise KdError(
            f"opset={cfg.opset}: torch's ONNX exporter writes opset {MIN_OPSET} or newer; "
            f"use opset={MIN_OPSET} or higher"
        )
    if cfg.format == "onnx" and cfg.opset > (newest := newest_opset()):
        raise KdError(f"opset={cfg.opset}: the installed onnx knows opsets up to {newest}; use opset={newest} or lower")
    check_number("check_batch_size", cfg.check_batch_size, Range(1, MAX_CHECK_BATCH), hint="images per check batch")
    if cfg.dynamic_batch and cfg.check_batch_size < 2:
        raise KdError(
            f"check_batch_size={cfg.check_batch_size}: a dynamic batch is traced from a batch of at "
            f"least 2 (a batch of 1 is taken as a constant); use check_batch_size=2 or more, or "
            f"dynamic_batch=false for a file fixed at batch 1"
        )
    check_number("tolerance", cfg.tolerance, Range(0), hint="the largest difference from PyTorch accepted")
    check_number("box_tolerance", cfg.box_tolerance, Range(0), hint="pixels a detector's exported box may differ by")


# --- inputs for the check ---


def check_batches(cfg: DictConfig, spec: ModelSpec, weights: Path) -> tuple[list[torch.Tensor], str]:
    """`check_batch_size` inputs (the export example too), then a batch of 1 when the batch is dynamic:
    the model's own test images when its data set is at hand, else random normal (normalised-like) ones."""
    sizes = [cfg.check_batch_size, *([1] if cfg.dynamic_batch else [])]
    images = data_set_images(spec, weights, sum(sizes), cfg.seed) if cfg.check_inputs == "auto" else None
    source = f"{spec.dataset} test images"
    if images is None:
        generator = torch.Generator().manual_seed(cfg.seed)
        shape = (sum(sizes), spec.in_channels, spec.input_size, spec.input_size)
        images, source = torch.randn(shape, generator=generator), "random normal inputs"
    return [batch.contiguous() for batch in images.split(sizes)], source


def data_set_images(spec: ModelSpec, weights: Path, count: int, seed: int) -> torch.Tensor | None:
    """The first `count` test images of the data set the run was trained on (read from its saved
    config, never downloaded), normalised as model.json says; None when they are not at hand."""
    from kd_cli.data import load_dataset, make_loader

    options = saved_dataset(weights)
    if options is None:
        log.info(f"export: no data set recorded beside {weights}; checking on random inputs")
        return None
    if "download" in options:
        options["download"] = False
    try:
        data = load_dataset(options)
        if (data.num_classes, data.in_channels, data.input_size) != (
            spec.num_classes,
            spec.in_channels,
            spec.input_size,
        ) or len(data.test) < count:
            log.info(f"export: the recorded data set does not fit {weights}; checking on random inputs")
            return None
        loader = make_loader(
            data.test,
            batch_size=count,
            train=False,
            spec=None,
            mean=spec.mean,
            std=spec.std,
            device=torch.device("cpu"),
            seed=seed,
            num_workers=0,
        )
        images, _labels = next(iter(loader))  # (an unreadable image among them is a KdError too)
    except KdError as error:
        log.info(f"export: its data set is not at hand ({error}); checking on random inputs")
        return None
    assert isinstance(images, torch.Tensor)  # (a detection split's images come as one tensor too)
    return images.float()


def compare(
    run: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], expected: list[torch.Tensor]
) -> dict:
    """Max |exported - PyTorch| over every batch, the largest |output| for scale, and the % of predictions
    (images; pixels for a segmenter) whose class (argmax) is the same."""
    diff, scale, same, total = 0.0, 0.0, 0, 0
    for batch, reference in zip(batches, expected):
        got = run(batch)
        if got.shape != reference.shape:
            raise KdError(
                f"the exported file returned shape {tuple(got.shape)} for a batch of {len(batch)}, "
                f"PyTorch {tuple(reference.shape)}"
            )
        batch_diff = (got.double() - reference.double()).abs().max().item()
        diff = max(diff, math.inf if math.isnan(batch_diff) else batch_diff)  # NaN must not pass
        scale = max(scale, reference.abs().max().item())
        same += int((got.argmax(1) == reference.argmax(1)).sum())
        total += reference.argmax(1).numel()
    return {"max_abs_diff": diff, "max_abs_output": scale, "argmax_agreement": 100.0 * same / max(total, 1)}


# --- ONNX ---


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, cfg: DictConfig, meta_text: str) -> None:
    dynamic = ({0: torch.export.Dim("batch")},) if cfg.dynamic_batch else None
    with exporter_output() as output:
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=cfg.opset,
                dynamic_shapes=dynamic,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                external_data=False,
                verbose=False,
            )
        except Exception as error:  # torch.export's report is pages long: one line here, the whole in a file
            report = path.parent / ONNX_REPORT
            report.write_text(f"{error}\n\n{output.getvalue()}")
            raise KdError(
                f"ONNX export failed: {_root_cause(error)}; the exporter's report is in {report}; "
                f"format=torchscript may work"
            ) from error
    assert program is not None  # dynamo=True returns the ONNX program
    program.model.metadata_props[METADATA_KEY] = meta_text
    program.save(str(path), external_data=False)
    written = onnx_opset(path)
    if written != cfg.opset:
        raise KdError(
            f"opset={cfg.opset} was asked for but the exporter wrote opset {written} (it could not "
            f"convert the graph); use opset={written}"
        )
    if output.getvalue().strip():
        sys.stderr.write(output.getvalue())  # it exported: pass on what the exporter had to say


def onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # an opset newer than this onnxruntime knows, for one
        raise KdError(f"onnxruntime {ort.__version__} cannot load the exported file: {first_line(error)}") from error

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0])

    return run


def onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


# --- TorchScript ---


@contextmanager
def _jit_deprecation_silenced() -> Iterator[None]:
    """torch.jit.trace/save/load warn that torch.jit is deprecated (FutureWarning); only that is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, cfg: DictConfig, meta_text: str) -> None:
    try:
        with _jit_deprecation_silenced(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)  # the check below compares outputs
            torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: meta_text})
    except Exception as error:
        raise KdError(f"TorchScript export failed: {first_line(error)} (KD_DEBUG=1 shows the traceback)") from error


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with _jit_deprecation_silenced():
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(batch: torch.Tensor) -> torch.Tensor:
        with _jit_deprecation_silenced(), torch.no_grad():
            return loaded(batch)

    return run


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause (torch.export's own message), without colour codes."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


def _versions(fmt: str) -> dict:
    if fmt != "onnx":
        return {}
    import onnx
    import onnxruntime
    import onnxscript

    return {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}
