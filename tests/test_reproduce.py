"""`kd reproduce` through the real CLI: a sweep job made with a user config folder (`-cd`) and a
relative `paths.outputs` reproduces exactly (CPU, same seed), from another working directory; after a
default in that folder changes, the change is listed and the metrics differ (exit 1); what is not a
complete kd run is a one-line error."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

import pytest
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok, kd_ok

TINY = [*FAST, "trainer.epochs=2"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A teacher, then one distill job (`-m`, seed 1) on `mydigits`: a user copy of the digits config."""
    root = tmp_path_factory.mktemp("reproduce")
    (root / "userconf" / "dataset").mkdir(parents=True)
    digits = files("kd_cli.configs").joinpath("dataset", "digits.yaml").read_text()
    (root / "userconf" / "dataset" / "mydigits.yaml").write_text(digits)
    kd_here_ok("train-teacher", *TINY, "paths.outputs=outputs", cwd=root)
    kd_here_ok(
        "distill",
        "-m",
        "-cd",
        str(root / "userconf"),
        "dataset=mydigits",
        "seed=1",
        *TINY,
        "paths.outputs=outputs",
        cwd=root,
    )
    return root


def original_run(project: Path) -> Path:
    (run,) = (project / "outputs" / "multirun").glob("*/*/0")
    return run


def reproductions(project: Path) -> list[Path]:
    return sorted(p.parent for p in (project / "outputs" / "reproduce").glob("*/*/reproduce.json"))


def test_unchanged_run_reproduces_identically(project, tmp_path):
    run = original_run(project)
    out = kd_here_ok("reproduce", str(run), cwd=tmp_path).stdout  # elsewhere: relative paths follow the run
    assert "equals the saved config_resolved.yaml" in out
    assert "teacher: pinned to the original run's teacher" in out
    assert "reproduced: the final metrics are identical" in out
    (new,) = reproductions(project)
    assert json.loads((new / "summary.json").read_text())["status"] == "complete"
    assert json.loads((new / "reproduce.json").read_text())["reproduces"] == str(run)
    # `kd report` keeps the reproduction out of the averages: it repeats seed 1.
    report = kd_here_ok("report", str(project / "outputs"), cwd=tmp_path).stdout
    assert "1 run(s) made by `kd reproduce` not counted" in report


def test_changed_default_is_listed_and_metrics_differ(project, tmp_path):
    config = project / "userconf" / "dataset" / "mydigits.yaml"
    saved = config.read_text()
    config.write_text(saved.replace("test_fraction: 0.3", "test_fraction: 0.5"))
    try:
        result = kd_here("reproduce", str(original_run(project)), cwd=tmp_path)
    finally:
        config.write_text(saved)
    assert result.code == 1, result.stderr[-2000:]
    assert "dataset.test_fraction: 0.3 → 0.5" in result.stdout
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("not reproduced:")]
    assert len(verdicts) == 1 and "differ from the original run" in verdicts[0]
    assert "summary.json best_top1" in result.stdout or "summary.json last_top1" in result.stdout
    assert "Traceback" not in result.stderr


def test_what_is_not_a_complete_run_is_one_line(project, tmp_path):
    assert_one_line_error(kd_here("reproduce", str(tmp_path), cwd=tmp_path), "not a kd run directory")
    assert_one_line_error(kd_here("reproduce", "/no/such/run", cwd=tmp_path), "no such directory")
    sweep = original_run(project).parent
    assert_one_line_error(kd_here("reproduce", str(sweep), cwd=tmp_path), "sweep folder")
    failed = tmp_path / "failed"
    shutil.copytree(original_run(project), failed)
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "on purpose"}))
    assert_one_line_error(kd_here("reproduce", str(failed), cwd=tmp_path), "is failed, not complete")
    assert_one_line_error(kd_here("reproduce", cwd=tmp_path), "RUN_DIR")
    assert_one_line_error(
        kd_here("reproduce", str(failed / "summary.json"), cwd=tmp_path), "is a file", "run directory"
    )
    emptied = tmp_path / "emptied"
    shutil.copytree(original_run(project), emptied)
    (emptied / "metrics.csv").write_text("")
    assert_one_line_error(
        kd_here("reproduce", str(emptied), cwd=tmp_path), "metrics.csv holds no epoch", "nothing was started"
    )
    weird = tmp_path / "weird"
    shutil.copytree(original_run(project), weird)
    (weird / "summary.json").write_text(json.dumps({"status": "weird"}))
    line = assert_one_line_error(kd_here("reproduce", str(weird), cwd=tmp_path), "'weird', which kd does not write")
    assert "resume" not in line
    imported = tmp_path / "imported"
    shutil.copytree(original_run(project), imported)
    hydra = imported / ".hydra" / "config.yaml"
    hydra.write_text(hydra.read_text().replace("stage: distill", "stage: import"))
    assert_one_line_error(
        kd_here("reproduce", str(imported), cwd=tmp_path), "is a kd import run", "reruns train-teacher"
    )


def test_the_reproduction_goes_under_the_paths_outputs_given(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    kd_here_ok("reproduce", str(original_run(project)), f"paths.outputs={elsewhere}", cwd=tmp_path)
    assert list(elsewhere.glob("reproduce/*/*/reproduce.json"))


def test_a_reproduction_refused_by_its_child_leaves_no_folder(project, tmp_path):
    """A rerun its child refuses (a bad override) removes the folders made for it, --out's included."""
    out = tmp_path / "new" / "place"
    result = kd_here("reproduce", str(original_run(project)), "--out", str(out), "trainer.epochs=0", cwd=tmp_path)
    assert_one_line_error(result, "trainer.epochs=0")
    assert not (tmp_path / "new").exists()


def test_a_complete_run_missing_part_of_its_record_says_what_cannot_be_compared(project, tmp_path):
    """config_resolved.yaml or env.json gone from a complete run: each is named in one warning that says
    what the comparison loses; the metrics are still compared (not "the run stopped before it started")."""
    copy = tmp_path / "copy"
    shutil.copytree(original_run(project), copy)
    (copy / "config_resolved.yaml").unlink()
    (copy / "env.json").unlink()
    result = kd_here("reproduce", str(copy), cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2 and all(line.startswith("kd: warning: ") for line in warnings), warnings
    assert (
        "config_resolved.yaml is missing" in warnings[0] and "a default changed since would go unnoticed" in warnings[0]
    )
    assert "env.json is missing" in warnings[1] and "versions, git commit" in warnings[1]
    assert "reproduced: the final metrics are identical" in result.stdout


def test_a_student_run_does_not_depend_on_how_its_teacher_came_to_be(tmp_path):
    """The same distill command ends the same whether its teacher was trained in that command (none
    found) or found on disk: building, loading or training another model first draws nothing from the
    student's random streams (its initialisation, the method's adapters, the loop's dropout)."""
    command = [
        "distill",
        *TINY,
        "student=cnn",
        "student.kwargs.width=4",
        "method=fitnet",
        "seed=3",
        "paths.outputs=outputs",
    ]
    kd_ok(*command, cwd=tmp_path)  # no teacher yet: trained first, in a subprocess
    kd_here_ok(*command, cwd=tmp_path)  # the teacher found (in this process: nor does the process matter)
    first, second = sorted((tmp_path / "outputs" / "distill").glob("*/*/summary.json"))
    trained_here, found = (json.loads(p.read_text()) for p in (first, second))
    assert trained_here["teacher_run"] == found["teacher_run"]
    for key in ("last_top1", "best_top1", "last_train_loss"):
        assert trained_here[key] == found[key], key
    assert (first.parent / "metrics.csv").read_text().count("\n") == 3
    out = kd_here_ok("reproduce", str(first.parent), cwd=tmp_path).stdout
    assert "reproduced: the final metrics are identical" in out


def test_random_streams_are_isolated():
    """A stream's draws come from (seed, name) alone and leave the global generators where they were;
    a saved model rebuilt for loading draws nothing from them."""
    import torch

    from kd_cli.engine.artifacts import ModelSpec
    from kd_cli.engine.device import random_stream

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with random_stream(5, "model"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(10)  # whatever happened before does not matter
    with random_stream(5, "model"):
        assert torch.equal(torch.rand(3), a)
    with random_stream(5, "method"):
        assert not torch.equal(torch.rand(3), a)
    spec = ModelSpec("cnn", {}, 10, 1, 8, [0.5], [0.5], [str(i) for i in range(10)], "digits")
    before = torch.get_rng_state()
    spec.build()
    assert torch.equal(torch.get_rng_state(), before)
