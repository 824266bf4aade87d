"""The benchmarks still run (tiny sizes; no timing is asserted: the figures belong in the README)."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

import pytest
from kdrun import restore_torch_state, torch_state

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = {
    "throughput.py": [
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--samples",
        "128",
        "--epochs",
        "2",
        "--aug-samples",
        "256",
        "--aug-epochs",
        "1",
        "--workers",
        "0",
    ],
    "precision.py": ["--teacher", "resnet8", "--student", "resnet8", "--samples", "128", "--epochs", "2"],
    "teacher_cache.py": ["--teacher", "resnet8", "--student", "resnet8", "--samples", "128", "--epochs", "2"],
    "startup.py": ["--repeats", "1"],
    "image_folder.py": ["--images", "1024", "--epochs", "1"],
    "segmentation.py": ["--scenes", "128", "--epochs", "2", "--repeats", "1"],
    "detection.py": ["--scenes", "64", "--epochs", "2", "--repeats", "1"],
}

PRINTS = {
    "throughput.py": "ratio kd / plain",
    "precision.py": "ratio kd auto / kd fp32",
    "teacher_cache.py": "metrics with cache == without: True",
    "startup.py": "kd distill --cfg job",
    "image_folder.py": "ratio kd / torchvision",
    "segmentation.py": "kd engine",
    "detection.py": "kd engine",
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_the_benchmark_runs(script, tmp_path, monkeypatch):
    """Each script as `python benchmarks/SCRIPT ARGS` would run it, in this process (no start-up to pay)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *TINY[script]])
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as for a script: its folder first on the path
    out, before, environment = io.StringIO(), torch_state(), dict(os.environ)
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (0, None), out.getvalue()[-3000:]
    finally:
        restore_torch_state(before)
        os.environ.clear()
        os.environ.update(environment)
    assert PRINTS[script] in out.getvalue()


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(TINY)
