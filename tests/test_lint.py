"""`make lint` is a real gate: ruff with the project's rules fails on an unused import and on a name whose
import was removed, and passes on the code as it is. (mypy runs in `make lint` too; it is slower, so it
is not repeated here.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RUFF = Path(sys.executable).with_name("ruff")
SOURCE = ROOT / "kd_cli" / "methods" / "kd.py"

pytestmark = pytest.mark.skipif(not RUFF.exists(), reason="ruff is installed by the test extra (make test)")


def ruff(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RUFF), "check", "--config", str(ROOT / "pyproject.toml"), "--no-cache", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_code_passes():
    assert ruff(ROOT).returncode == 0


def test_an_unused_import_fails(tmp_path):
    copy = tmp_path / "kd.py"
    copy.write_text(SOURCE.read_text().replace("import torch\n", "import torch\nimport json\n", 1))
    result = ruff(copy)
    assert result.returncode == 1 and "F401" in result.stdout


def test_removing_an_import_that_is_used_fails(tmp_path):
    copy = tmp_path / "kd.py"
    text = SOURCE.read_text()
    assert "import torch.nn.functional as F\n" in text and "F.cross_entropy" in text
    copy.write_text(text.replace("import torch.nn.functional as F\n", "", 1))
    result = ruff(copy)
    assert result.returncode == 1 and "F821" in result.stdout


def test_the_format_is_checked(tmp_path):
    copy = tmp_path / "kd.py"
    shutil.copy(SOURCE, copy)
    copy.write_text(copy.read_text().replace("import torch\n", "import   torch\n", 1))
    result = subprocess.run(
        [str(RUFF), "format", "--check", "--config", str(ROOT / "pyproject.toml"), str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
