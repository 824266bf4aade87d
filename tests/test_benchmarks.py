"""The benchmarks still run (tiny sizes; no timing is asserted: the figures belong in the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
}

PRINTS = {
    "throughput.py": "ratio kd / plain",
    "precision.py": "ratio kd auto / kd fp32",
    "teacher_cache.py": "metrics with cache == without: True",
    "startup.py": "kd distill --cfg job",
    "image_folder.py": "ratio kd / torchvision",
    "segmentation.py": "kd engine",
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_the_benchmark_runs(script, tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *TINY[script]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert PRINTS[script] in done.stdout


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(TINY)
