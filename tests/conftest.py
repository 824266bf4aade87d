import os
import sys
from pathlib import Path

# One thread per process: `make test` runs one pytest worker per core (pytest-xdist), and each `kd`
# subprocess inherits this. Several processes each spinning 2 OpenMP threads on 2 cores run many
# times slower than one thread each. (Same seed, same thread count -> identical numbers.)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests' shared helpers (formats.py, kdrun.py)

import fcntl  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from kdrun import SHORT, SYNTHETIC, kd  # noqa: E402

# The teachers most CLI tests of methods distil from: a few steps on the embedded digits (kd's default
# cnn teacher) and resnet20 on CIFAR-shaped synthetic data. Trained once per test session.
SHORT_TEACHERS = {"digits": [], "cifar": [*SYNTHETIC, "teacher=resnet20"]}


@pytest.fixture(scope="session")
def short_teachers(tmp_path_factory) -> dict[str, Path]:
    """{"digits": run, "cifar": run}: finished `kd train-teacher` runs (SHORT settings) to pass as
    `teacher.checkpoint=`, trained once for the whole session. The pytest-xdist workers share them through
    the session's base folder: the first to get the lock trains them, the others wait and read. Tests
    read them only (a distill never writes into its teacher's run); copy one before changing it."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = shared / "short-teachers"
    with open(shared / "short-teachers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for name, extra in SHORT_TEACHERS.items():
                result = kd("train-teacher", *SHORT, *extra, f"hydra.run.dir={folder / name}", cwd=folder)
                assert result.code == 0, result.stderr[-3000:]
            (folder / "done").touch()
    return {name: folder / name for name in SHORT_TEACHERS}


@pytest.fixture(scope="session")
def compose_config():
    """compose_config(config, *overrides) -> the stage's config composed in this process, as the CLI
    composes it before running (Hydra's Compose API, kd's structured configs registered): for tests of
    composition and of the checks made on a config, without a process or a run directory."""
    from hydra import compose, initialize_config_module

    from kd_cli.config import register_configs

    def composed(config: str, *overrides: str, hydra_config: bool = False):
        register_configs()
        with initialize_config_module(config_module="kd_cli.configs", version_base="1.3"):
            return compose(config, overrides=list(overrides), return_hydra_config=hydra_config)

    return composed


# The files that take longest (seconds of one worker, measured with --durations), run first: pytest-xdist
# hands a file (--dist loadfile) to whichever worker is free, in collection order, so a long file left
# to the end keeps one worker busy while the other waits. Longest first keeps both busy to the end.
LONGEST_FIRST = [
    "test_segmentation_bars.py",  # (slow only: the longest of `make test-slow`)
    "test_run_directories.py",
    "test_pipeline.py",
    "test_table.py",
    "test_compress.py",
    "test_reproduce.py",
    "test_methods_zoo.py",
    "test_launchers.py",
    "test_trackers.py",
    "test_methods_feature.py",
    "test_online.py",
    "test_export.py",
    "test_import.py",
    "test_report.py",
    "test_benchmarks.py",
    "test_methods_preactivation.py",
    "test_methods_mlkd.py",
    "test_teacher_cache.py",
    "test_segmentation.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
