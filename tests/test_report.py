"""`kd report` through the real CLI: a sweep of 3 temperatures x 2 seeds on digits, grouped over seeds
into 3 settings (mean ± std, n=2), filtered, sorted, written as CSV/Markdown/PNG; unfinished runs are
shown as such and never averaged in; bad paths are one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok

TINY = [*FAST, "trainer.epochs=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One teacher, then `kd distill -m method.temperature=1,4,8 seed=0,1`: the sweep folder."""
    root = tmp_path_factory.mktemp("report")
    outputs = f"paths.outputs={root / 'outputs'}"
    kd_here_ok("train-teacher", *TINY, outputs, cwd=root)
    kd_here_ok("distill", "-m", "method.temperature=1,4,8", "seed=0,1", *TINY, outputs, cwd=root)
    (folder,) = (root / "outputs" / "multirun").glob("*/*")
    return folder


def jobs(sweep: Path) -> dict[tuple[str, str], Path]:
    """(temperature, seed) -> run directory, from each job's saved overrides."""
    found = {}
    for run in sweep.glob("*/.hydra/overrides.yaml"):
        values = dict(o.split("=", 1) for o in yaml.safe_load(run.read_text()))
        found[(values["method.temperature"], values["seed"])] = run.parent.parent
    return found


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of the rich table, as stripped cells."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]


def best(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["best_top1"]


def test_sweep_writes_one_complete_run_per_job(sweep):
    runs = jobs(sweep)
    assert sorted(runs) == [(t, s) for t in ("1", "4", "8") for s in ("0", "1")]
    assert all(json.loads((run / "summary.json").read_text())["status"] == "complete" for run in runs.values())


def test_one_row_per_setting_with_mean_and_std_over_seeds(sweep, tmp_path):
    rows = table_rows(kd_here_ok("report", str(sweep), cwd=tmp_path).stdout)
    assert [row[0] for row in rows] == ["1", "4", "8"]  # the one varying key, in numeric order
    runs = jobs(sweep)
    for row in rows:
        values = [best(runs[(row[0], seed)]) for seed in ("0", "1")]
        assert row[1] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert row[3] == "2" and row[-1] == "2 complete"
    by_best = table_rows(kd_here_ok("report", str(sweep), "--sort=-best_top1", cwd=tmp_path).stdout)
    means = [float(row[1].split(" ± ")[0]) for row in by_best]
    assert means == sorted(means, reverse=True)


def test_csv_and_markdown_hold_the_table(sweep, tmp_path):
    kd_here_ok("report", str(sweep), "--csv", "out/table.csv", "--markdown", "table.md", cwd=tmp_path)
    with open(tmp_path / "out" / "table.csv") as handle:
        records = list(csv.DictReader(handle))
    assert [r["method.temperature"] for r in records] == ["1", "4", "8"]
    assert all(r["n"] == "2" and float(r["best_top1_std"]) >= 0 for r in records)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert len(lines) == 2 + 3 and all(line.startswith("| ") for line in lines)
    assert "best top-1 %" in lines[0] and "±" in lines[2]


def test_report_never_writes_over_a_file_or_into_a_run(sweep, tmp_path):
    """--csv on an existing file is refused without --overwrite; nothing is written inside a run directory
    (the run's summary.json was once replaced by the table)."""
    run = next(p.parent for p in sweep.glob("*/summary.json"))
    before = (run / "summary.json").read_bytes()
    inside = kd_here("report", str(sweep), "--csv", str(run / "summary.json"), "--overwrite", cwd=tmp_path)
    assert_one_line_error(inside, "is inside the run directory", "which only its run writes")
    assert_one_line_error(kd_here("report", str(sweep), "--plot", str(run / "plots"), cwd=tmp_path), "inside the run")
    assert (run / "summary.json").read_bytes() == before and not (run / "plots").exists()
    (tmp_path / "mine.csv").write_text("keep me")
    assert_one_line_error(kd_here("report", str(sweep), "--csv", "mine.csv", cwd=tmp_path), "exists", "--overwrite")
    assert (tmp_path / "mine.csv").read_text() == "keep me"
    kd_here_ok("report", str(sweep), "--csv", "mine.csv", "--overwrite", cwd=tmp_path)
    assert (tmp_path / "mine.csv").read_text().startswith("method.temperature")


def test_plots_are_real_pngs(sweep, tmp_path):
    out = kd_here_ok("report", str(sweep), "--plot", "plots", cwd=tmp_path).stdout
    plots = tmp_path / "plots"
    for name in ("best_top1_vs_method.temperature.png", "curves_test_top1.png", "curves_train_loss.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 200, name
        assert name in out


def test_where_filters_on_overrides_and_saved_config(sweep, tmp_path):
    rows = table_rows(kd_here_ok("report", str(sweep), "--where", "method.temperature=4", cwd=tmp_path).stdout)
    assert len(rows) == 1 and rows[0][-1] == "2 complete"
    assert len(table_rows(kd_here_ok("report", str(sweep), "--where", "method.name=kd", cwd=tmp_path).stdout)) == 3
    line = assert_one_line_error(
        kd_here("report", str(sweep), "--where", "method.temperature=5", cwd=tmp_path), "method.temperature=5"
    )
    assert "1, 4, 8" in line


def test_unfinished_runs_are_shown_and_not_averaged(sweep, tmp_path):
    runs = jobs(sweep)
    for status in ("failed", "interrupted"):  # copies of the T=4 seed 0 job that did not complete
        copy = tmp_path / "more" / status
        shutil.copytree(runs[("4", "0")], copy)
        summary = json.loads((copy / "summary.json").read_text())
        summary.update(status=status, best_top1=0.0, last_top1=0.0, error=f"{status} on purpose")
        (copy / "summary.json").write_text(json.dumps(summary))
    out = kd_here_ok("report", str(sweep), str(tmp_path / "more"), cwd=tmp_path).stdout
    row = next(row for row in table_rows(out) if row[0] == "4")
    values = [best(runs[("4", seed)]) for seed in ("0", "1")]
    assert row[1].startswith(f"{statistics.fmean(values):.2f} ± ")  # the zeros are not in the mean
    assert row[3] == "2" and row[-1] == "2 complete, 1 failed, 1 interrupted"
    assert "failed: " in out and "failed on purpose" in out and "interrupted on purpose" in out


def test_bad_input_is_one_line(tmp_path):
    assert_one_line_error(kd_here("report", "/no/such/dir", cwd=tmp_path), "/no/such/dir")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_one_line_error(kd_here("report", "empty", cwd=tmp_path), "no kd runs")
    assert_one_line_error(kd_here("report", cwd=tmp_path), "PATH")
    assert_one_line_error(kd_here("report", "empty", "--metric", "top9", cwd=tmp_path), "--metric")
