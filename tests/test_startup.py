"""Start-up: the commands that need no model (help, `--cfg job`, completion, a wrong plain value) do
not import torch, so they answer in a fraction of a second (the times are in benchmarks/startup.py).
The model names Hydra needs come from kd_cli/model_index.json, which must match the models."""

from __future__ import annotations

import json
import subprocess
import sys

from kd_cli import model_index

LIGHT_COMMANDS = [
    ["--help"],
    ["distill", "--help"],
    ["distill", "dataset=cifar100", "student=resnet8x4", "--cfg", "job"],
    ["train-teacher", "--cfg", "job"],
    ["distill", "trainer.epochs=0"],
    ["distill", "optim.lr=nan"],
    ["evaluate", "--help"],
    ["predict", "--help"],
    ["predict", "run=somewhere", "top_k=0", "photo.png"],
    ["cache", "--help"],
]

PROBE = """
import json, sys
from hydra.core.global_hydra import GlobalHydra
from kd_cli.cli import main
results = []
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as exit_:
        results.append(exit_.code)
    GlobalHydra.instance().clear()
print(json.dumps({"codes": results, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_the_index_matches_the_registered_models():
    saved = json.loads(model_index.INDEX_FILE.read_text())
    assert saved["fingerprint"] == model_index.sources_fingerprint(), (
        "kd_cli/model_index.json is stale: run `python -m kd_cli.model_index`"
    )
    assert saved["models"] == model_index.build_index()


def test_a_stale_index_is_not_used(tmp_path, monkeypatch):
    stale = tmp_path / "model_index.json"
    stale.write_text(json.dumps({"fingerprint": "old", "models": {"gone": {}}}))
    monkeypatch.setattr(model_index, "INDEX_FILE", stale)
    index = model_index.model_index()
    assert "gone" not in index and index == model_index.build_index()


def test_commands_that_need_no_model_do_not_import_torch(tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(LIGHT_COMMANDS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    outcome = json.loads(probe.stderr.strip().splitlines()[-1])
    assert outcome["codes"] == [0, 0, 0, 0, 2, 2, 0, 0, 2, 0], probe.stderr
    assert not outcome["torch"]
    assert (
        "trainer.epochs=0 must be in [1, 1000000]" in probe.stderr
        and "optim.lr=nan must be a finite number" in probe.stderr
    )
    assert "0 must be at least 1" in probe.stderr
    assert not list((tmp_path / "outputs").glob("*/*/*")), "a refused run left its run directory"
