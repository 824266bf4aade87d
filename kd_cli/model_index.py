"""The registered model names and their options, read without importing torch.

Hydra needs one `teacher=NAME` / `student=NAME` option per model before it can compose any config,
and `kd STAGE --help`, `--cfg job`, completion and every bad-value error compose one. Importing the
models to list them costs seconds (torch, torchvision), so their names and options are kept in
`model_index.json` beside this file, stamped with a hash of the model sources. When the stamp does not
match the sources (a model was added or changed and the index not regenerated), the models are
imported and the index built in memory: slower, never wrong. Regenerate it with
`python -m kd_cli.model_index` (a test fails while it is stale).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

INDEX_FILE = Path(__file__).with_name("model_index.json")
MODEL_SOURCES = Path(__file__).with_name("models")
FIXED = ("num_classes", "in_channels", "input_size")  # from the data set, not options


def model_options(builder: Callable) -> dict[str, Any]:
    """The keyword options of a model builder with their defaults (the code is their one source)."""
    params = inspect.signature(builder).parameters.items()
    return {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in params
        if name not in FIXED and p.default is not inspect.Parameter.empty
    }


def sources_fingerprint() -> str:
    """sha256 over the model package's Python files, by name and content."""
    digest = hashlib.sha256()
    for path in sorted(MODEL_SOURCES.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_index() -> dict[str, dict[str, Any]]:
    """Every registered model's options, from the models themselves (imports torch)."""
    from kd_cli.models import MODELS

    return {name: model_options(MODELS.get(name)) for name in MODELS.names()}


def model_index() -> dict[str, dict[str, Any]]:
    """name -> options: from the index file when it matches the sources, else built from the models."""
    try:
        saved = json.loads(INDEX_FILE.read_text())
    except (OSError, ValueError):
        saved = {}
    if isinstance(saved, dict) and saved.get("fingerprint") == sources_fingerprint():
        return saved["models"]
    return build_index()


def write_index() -> Path:
    content = {"fingerprint": sources_fingerprint(), "models": build_index()}
    INDEX_FILE.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    return INDEX_FILE


if __name__ == "__main__":
    print(f"wrote {write_index()}")
