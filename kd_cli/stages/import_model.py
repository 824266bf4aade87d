"""`kd import PATH arch=NAME dataset=...`: a checkpoint someone has -> a kd model directory.

The checkpoint is read by models/foreign_weights.py (weights_only, unnested, wrapper prefixes stripped),
loaded strictly into `model.arch` built for the data set's classes, channels and size (a mismatch is one line
with counts and the first names), scored on the data set's test split by the data set's task (top-1 for a
classifier, mIoU for a segmenter, COCO mAP for a detector; non-finite outputs refused), saved as
model.safetensors + model.json, then reloaded from those files and required to give the same outputs. The run
directory then works everywhere a kd model does: teacher.checkpoint=, kd evaluate, kd compress, kd export, kd
predict. A torchvision detector's checkpoint (its own keys, `backbone.body...`) loads into kd's wrapper
(`detector.backbone.body...`) as it is.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from kd_cli.data import load_dataset
from kd_cli.engine.artifacts import ModelSpec, load_model, save_model
from kd_cli.engine.files import read_json
from kd_cli.engine.metrics import score
from kd_cli.engine.rundir import COMPLETE, RunDir
from kd_cli.errors import KdError, warn
from kd_cli.models.foreign_weights import fit_state, read_state_dict
from kd_cli.models.hf_models import hf_from_folder
from kd_cli.stages.data import dataset_options, eval_loader
from kd_cli.stages.lifecycle import start_run
from kd_cli.stages.models import count_parameters, model_spec
from kd_cli.stages.results import print_results
from kd_cli.stages.setup import setup_run
from kd_cli.tasks import get_task

log = logging.getLogger("kd")
SAME_OUTPUTS = 1e-5  # largest |saved model - imported module| over the test logits


def main(cfg: DictConfig, run: RunDir) -> float:
    started = time.time()
    setup = setup_run(cfg)
    source = Path(str(cfg.source)).expanduser()
    if not source.exists():
        raise KdError(f"source={source} does not exist; give a .pt/.pth/.safetensors file or a save_pretrained folder")
    state = read_state_dict(source, cfg.nested) if cfg.model.arch != "hf" else None  # a bad file fails first
    data = load_dataset(dataset_options(cfg))
    spec = model_spec(cfg.model, data, cfg.dataset)
    if spec.arch == "hf":  # transformers reads its own folders (it renames keys across its versions)
        spec.kwargs["config"] = hf_config(source, spec.kwargs.get("config"), data.class_names)
        model = hf_from_folder(source, spec.num_classes, spec.in_channels, spec.input_size)
    else:
        assert state is not None  # read above for every arch but hf
        model, spec = fit_some_layout(state, spec, dict(cfg.model.kwargs), source)
    model = model.to(setup.device).eval()
    loader = eval_loader(cfg, data.test, spec, setup.device)
    task = get_task(data.task)
    scores = score(model, loader, setup.device, torch.float32, task.new_score(spec.num_classes))
    if not scores.all_finite:
        raise KdError(
            f"{source} as {spec.arch} gives non-finite outputs (NaN or inf) on the test images; "
            "the checkpoint is broken or belongs to another architecture"
        )
    start_run(
        cfg,
        run,
        setup,
        device=str(setup.device),
        seed=cfg.seed,
        data_fingerprint=data.fingerprint,
        source=str(source.resolve()),
        source_sha256=_digest(source),
    )
    save_model(run.path, model, spec)
    _check_saved(run, setup.device, loader, model)
    value = scores.result()[task.metric]
    summary = {
        "stage": "import",
        "role": "imported",
        "arch": spec.arch,
        "dataset": spec.dataset,
        "task": task.name,
        "metric": task.metric,
        "source": str(source.resolve()),
        task.metric: value,
        f"best_{task.metric}": value,
        f"last_{task.metric}": value,
        "params": count_parameters(model),
        "wall_time_s": time.time() - started,
    }
    run.write_summary(COMPLETE, **summary)
    print_results(
        f"import {source.name} as {spec.arch} ({spec.dataset})",
        [
            (f"test {task.metric_label} %", value),
            ("parameters", summary["params"]),
            ("test images", len(data.test)),
        ],
        run.path,
    )
    return value


def fit_some_layout(state: dict, spec: ModelSpec, given: dict, source: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """The network with the checkpoint loaded, in the layout it fits: the one asked for, else the others the
    builder offers for each layout option not given (`layout_options`: torchvision's `stem`, small-input or
    ImageNet's), said in one line. Where several fit (a stem that is a 3x3 conv either way, only its stride
    differs), the weights cannot tell which was trained: one line asks for the option, never a guess. A
    checkpoint that fits none: the first refusal."""
    from kd_cli.models import MODELS

    layouts = getattr(MODELS.get(spec.arch), "layout_options", {})
    open_options = {option: values for option, values in layouts.items() if option not in given}
    candidates = [spec.kwargs] + [
        {**spec.kwargs, option: value}
        for option, values in open_options.items()
        for value in values
        if value != spec.kwargs.get(option)
    ]
    fits, refusal = [], None
    for kwargs in candidates:
        candidate = replace(spec, kwargs=kwargs)
        model = candidate.build()
        try:
            fit_state(model, state, f"{source} as {spec.arch}")
        except KdError as error:
            refusal = refusal or error
            continue
        fits.append((model, candidate))
    if not fits:
        assert refusal is not None  # the loop tried at least the layout asked for
        if len(candidates) > 1:
            tried = ", ".join(f"{k}={v}" for kw in candidates[1:] for k, v in kw.items() if spec.kwargs[k] != v)
            raise KdError(f"{refusal} (nor with {tried})") from None
        raise refusal
    if len({_function(model) for model, _ in fits}) > 1:
        options = " or ".join(
            " ".join(f"model.kwargs.{k}={v}" for k, v in c.kwargs.items() if k in open_options) for _, c in fits
        )
        raise KdError(
            f"{source.name} fits {spec.arch} in {len(fits)} layouts that compute differently (the same weight "
            f"shapes, another stride); say which it was trained with: {options}"
        )
    model, chosen = fits[0]
    changed = {k: v for k, v in chosen.kwargs.items() if spec.kwargs.get(k) != v}
    if changed:
        log.info(
            f"import: {source.name} fits {spec.arch} with {' '.join(f'{k}={v}' for k, v in changed.items())}, "
            "not the default layout; imported so"
        )
    return model, chosen


def _function(model: torch.nn.Module) -> str:
    """What a layout computes beyond its weights: each module's repr (kernel, stride, padding, ...)."""
    return repr(model)


def hf_config(source: Path, given: dict | None, class_names: list[str]) -> dict:
    """arch=hf: the config.json of the save_pretrained folder (unless model.kwargs.config gives one);
    class names it lists that differ from the data set's are a warning (the outputs are read in order)."""
    from kd_cli.models.hf_models import config_labels

    if not source.is_dir():
        raise KdError(f"arch=hf imports a save_pretrained folder (config.json and weights); {source} is a file")
    if given:
        return dict(given)
    path = source / "config.json" if source.is_dir() else source.with_name("config.json")
    if not path.is_file():
        raise KdError(
            f"arch=hf reads the model's config.json from the save_pretrained folder, and {path} does not "
            "exist; give the folder as the source"
        )
    config = read_json(path)
    labels = config_labels(config)
    if labels is not None and labels != list(class_names):
        warn(
            f"{path} names the classes {', '.join(labels[:5])}{' ...' if len(labels) > 5 else ''} and the data set "
            f"{', '.join(class_names[:5])}{' ...' if len(class_names) > 5 else ''}; output k is read as the data "
            "set's k-th class"
        )
    return config


@torch.no_grad()
def _check_saved(run: RunDir, device: torch.device, loader, imported: torch.nn.Module) -> None:
    """What was written reloads to the same network: batch by batch (a segmenter's outputs for a whole
    split need not fit in memory), its outputs equal the imported module's."""
    reloaded, _ = load_model(run.path, device)
    reloaded.eval()
    difference = 0.0
    for images, _ in loader:
        difference = max(difference, output_difference(reloaded(images), imported(images)))
    if difference > SAME_OUTPUTS:
        raise KdError(
            f"the saved model's outputs differ from the imported module's by {difference:.2g}; the "
            f"architecture has state outside its state dict: report it (run directory {run.path})"
        )


def output_difference(got, expected) -> float:
    """The largest |got - expected| over two models' outputs on a batch: logits, or a detector's per-image
    boxes and scores (another number of boxes, or other labels, is an infinite difference)."""
    if isinstance(expected, torch.Tensor):
        return (got.float() - expected.float()).abs().max().item()
    largest = 0.0
    for mine, theirs in zip(got, expected, strict=True):
        if len(mine["boxes"]) != len(theirs["boxes"]) or not torch.equal(mine["labels"], theirs["labels"]):
            return float("inf")
        for key in ("boxes", "scores"):
            if len(theirs[key]):
                largest = max(largest, (mine[key].float() - theirs[key].float()).abs().max().item())
    return largest


def _digest(source: Path) -> str:
    """sha256 of the checkpoint (of its weights file, for a folder), for provenance in env.json."""
    path = source
    if source.is_dir():
        path = next(
            (source / name for name in ("model.safetensors", "pytorch_model.bin") if (source / name).is_file()), source
        )
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
