"""`kd table`: a literature table as one command. The description files (built in and the user's) are
checked in one line each; the grid's plan (recipes, teachers once, resume, what is skipped) and the
cells' verdicts are checked in process; `kd table cifar100 --small` runs end to end through the CLI:
teachers, sweeps, the CSV / Markdown / PNG with the published column, a rerun that trains nothing,
a stopped cell resumed, --report."""

from __future__ import annotations

import csv
import json
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from kdrun import assert_one_line_error, kd, kd_here, summary

from kd_cli.commands.table.command import cell_job, choose, make_cell, method_recipe, split_arguments
from kd_cli.commands.table.recipe import load_recipe
from kd_cli.errors import KdError

NO_CHANGES = Namespace(small=False, methods=None, pairs=None, seeds=None, tolerance=None, compare=None)


def test_the_cifar100_table_cites_a_source_for_every_published_figure():
    spec = load_recipe("cifar100")
    assert len(spec.pairs) == 8 and spec.seeds == 3 and spec.compare == "best"
    assert spec.figure("kd", "resnet32x4_resnet8x4").score == 73.33
    assert spec.figure("dkd", "resnet32x4_resnet8x4").score == 76.32
    assert spec.figure("reviewkd", "resnet56_resnet20") is None  # not in the sources read: no figure, not a guess
    cited = {figure.source for cells in spec.published.values() for figure in cells.values()}
    assert cited == {"repdistiller", "mdistiller"} and cited <= set(spec.sources)
    assert all(pair in spec.pairs for cells in spec.published.values() for pair in cells)


def test_the_segmentation_table_compares_miou_on_torchvisions_recipe(compose_config):
    spec = load_recipe("coco_voc_segmentation")
    assert spec.metric == "miou" and spec.metric_label == "mIoU" and spec.compare == "last"
    cited = {figure.source for cells in spec.published.values() for figure in cells.values()}
    assert cited == {"torchvision", "torchdistill"} and cited <= set(spec.sources)
    cell = make_cell(spec, "deeplabv3_resnet50_lraspp", "pixel_kd", [{"best_miou": 59.0, "last_miou": 58.5}])
    assert cell.status == "reproduced" and cell.delta == pytest.approx(0.3) and cell.published == 58.2
    assert make_cell(spec, "deeplabv3_resnet50_lraspp", "none", [{"last_top1": 90.0}]).status == "not run"
    pair = spec.pairs["deeplabv3_resnet50_lraspp"]
    overrides = method_recipe(spec, pair, "pixel_kd")
    cfg = compose_config("distill", *overrides)
    assert cfg.dataset.name == "coco_segmentation" and len(cfg.dataset.categories) == 20
    assert (cfg.teacher.arch, cfg.student.arch) == ("deeplabv3_resnet50", "lraspp_mobilenet_v3_large")
    assert cfg.optim.schedule == "poly" and cfg.optim.weight_decay == 1e-6 and cfg.method.name == "pixel_kd"


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda t: t["published"]["kd"].update({"resnet56_resnet20": [70.66, "a blog"]}), "cites 'a blog'"),
        (lambda t: t["published"]["kd"].update({"resnet56_resnet20": "70.66"}), "must be [score, source]"),
        (lambda t: t.update(metric="ap"), "metric=ap is not one of top1, miou, map"),
        (lambda t: t["pairs"].update({"odd": {"teacher": "resnet56"}}), "pairs.odd must give `teacher` and `student`"),
        (lambda t: t.update(compare="median"), "compare=median is not one of best, last"),
        (lambda t: t["small"].update(pairs=["nope"]), "small.pairs names nope"),
    ],
)
def test_a_broken_table_file_is_one_line_naming_the_key(tmp_path, change, fragment):
    table = yaml.safe_load((Path(load_recipe("cifar100").path)).read_text())
    change(table)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(table))
    with pytest.raises(KdError, match=None) as error:
        load_recipe(str(path))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_unknown_tables_methods_and_pairs_are_refused_with_the_choices():
    with pytest.raises(KdError, match="unknown table 'cifar10' .built in: cifar100"):
        load_recipe("cifar10")
    spec = load_recipe("cifar100")
    with pytest.raises(KdError, match="methods: kdd unknown .choose from: .*dkd"):
        choose(spec, Namespace(**{**vars(NO_CHANGES), "methods": "kd,kdd"}))
    with pytest.raises(KdError, match="pairs: resnet8_resnet8 not in the table"):
        choose(load_recipe("cifar100"), Namespace(**{**vars(NO_CHANGES), "pairs": "resnet8_resnet8"}))


def test_own_keys_are_the_commands_and_every_other_override_goes_to_each_run():
    own, overrides = split_arguments(
        ["cifar100", "methods=kd,dkd", "seeds=2", "hydra/launcher=joblib", "trainer.device=cuda", "--small"]
    )
    assert own == ["cifar100", "--methods", "kd,dkd", "--seeds", "2", "--small"]
    assert overrides == ["hydra/launcher=joblib", "trainer.device=cuda"]
    with pytest.raises(KdError, match="kd table sets seed itself"):
        split_arguments(["cifar100", "seed=1"])
    for word in ("student=resnet18", "teacher=resnet18", "method=dkd", "experiment=x", "student.arch=mlp"):
        with pytest.raises(KdError, match="sets .* itself from the table's pairs and methods"):
            split_arguments(["cifar100", word])
    assert split_arguments(["cifar100", "method.temperature=2", "student.kwargs.dropout=0.1"])[1] == [
        "method.temperature=2",
        "student.kwargs.dropout=0.1",
    ]


def test_methods_and_pairs_given_twice_or_empty():
    spec = choose(load_recipe("cifar100"), Namespace(**{**vars(NO_CHANGES), "methods": "kd,kd,dkd"}))
    assert spec.methods == ["kd", "dkd"]
    for key in ("methods", "pairs"):
        with pytest.raises(KdError, match="empty|no methods"):
            choose(load_recipe("cifar100"), Namespace(**{**vars(NO_CHANGES), key: ""}))


def test_a_method_takes_its_own_preset_for_the_pair_else_the_pairs_with_method_name():
    spec = load_recipe("cifar100")
    pair = spec.pairs["vgg13_mobilenetv2"]
    assert method_recipe(spec, pair, "dkd") == ["experiment=cifar100/dkd/vgg13_mobilenetv2"]
    assert method_recipe(spec, pair, "nst") == ["experiment=cifar100/pair/vgg13_mobilenetv2", "method=nst"]


def test_a_cell_is_planned_fresh_resumed_or_skipped(tmp_path):
    spec = load_recipe("cifar100")
    spec.seeds = 2
    pair = spec.pairs["resnet56_resnet20"]
    name, args = cell_job(spec, pair, "kd", tmp_path, ["trainer.epochs=1"], needs_teacher=True)
    assert args[:3] == ["distill", "-m", "experiment=cifar100/kd/resnet56_resnet20"]
    assert "seed=0,1" in args and f"teacher.checkpoint={tmp_path / 'teachers' / 'resnet56'}" in args
    assert "trainer.epochs=1" in args and "hydra.sweep.subdir=seed-${seed}" in args
    _, alone = cell_job(spec, pair, "none", tmp_path, [], needs_teacher=False)
    assert not any(a.startswith("teacher.checkpoint") for a in alone)
    sweep = tmp_path / "runs" / pair.name / "kd"
    for seed, status in enumerate(["complete", "interrupted"]):
        (sweep / f"seed-{seed}").mkdir(parents=True)
        (sweep / f"seed-{seed}" / "summary.json").write_text(json.dumps({"status": status}))
    assert cell_job(spec, pair, "kd", tmp_path, [], needs_teacher=True)[1] == ["distill", f"resume={sweep}"]
    (sweep / "seed-1" / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert cell_job(spec, pair, "kd", tmp_path, [], needs_teacher=True) is None
    spec.seeds = 3
    with pytest.raises(KdError, match="holds a sweep without seed-2"):
        cell_job(spec, pair, "kd", tmp_path, [], needs_teacher=True)


@pytest.mark.parametrize(
    "scores, status, delta",
    [
        ([70.5, 70.9], "reproduced", 0.04),
        ([69.0, 69.2], "below", -1.56),
        ([72.0, 71.0], "above", 0.84),
        ([], "not run", None),
    ],
)
def test_a_cell_is_reproduced_within_the_tolerance_else_below_or_above(scores, status, delta):
    spec = load_recipe("cifar100")
    cell = make_cell(spec, "resnet56_resnet20", "kd", [{"best_top1": s, "last_top1": s - 1} for s in scores])
    assert cell.status == status and cell.published == 70.66 and cell.source == "repdistiller"
    assert cell.delta == (None if delta is None else pytest.approx(delta))
    assert (
        make_cell(spec, "resnet56_resnet20", "reviewkd", [{"best_top1": 71.0, "last_top1": 70.0}]).status
        == "not published"
    )


# ---------------------------------------------------------------- the command, end to end


@pytest.fixture(scope="module")
def small_table(tmp_path_factory) -> tuple[Path, object]:
    work = tmp_path_factory.mktemp("table")
    result = kd("table", "cifar100", "--small", "trainer.progress=none", "trainer.num_workers=0", cwd=work)
    assert result.code == 0, result.stderr[-3000:]
    return work / "outputs" / "table" / "cifar100-small", result


def test_the_small_table_trains_each_teacher_once_and_sets_kd_beside_the_published_figures(small_table):
    out, result = small_table
    assert sorted(p.name for p in (out / "teachers").iterdir()) == ["resnet56", "wrn_40_2"]
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["pair"], r["method"]) for r in rows] == [
        (pair, method)
        for pair in ("resnet56_resnet20", "wrn_40_2_wrn_16_2")
        for method in ("teacher", "none", "kd", "at")
    ]
    cells = {(r["pair"], r["method"]): r for r in rows}
    assert cells[("resnet56_resnet20", "kd")]["published"] == "70.66"
    assert cells[("wrn_40_2_wrn_16_2", "at")]["source"] == "repdistiller"
    assert all(r["n"] == ("1" if r["method"] == "teacher" else "2") for r in rows)
    run = summary(out / "runs" / "resnet56_resnet20" / "kd" / "seed-1")
    assert run["status"] == "complete" and run["seed"] == 1 and run["teacher_run"] == str(out / "teachers" / "resnet56")
    assert float(cells[("resnet56_resnet20", "kd")]["delta (best)"]) < 0  # one short epoch: far below
    markdown = (out / "table.md").read_text()
    assert "| resnet56_resnet20 | kd | 2 |" in markdown and "RepDistiller README" in markdown
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kd table [8/8]" in result.stdout


def test_a_rerun_trains_nothing_and_a_stopped_cell_is_resumed(small_table):
    out, _ = small_table
    work = out.parents[2]
    again = kd("table", "cifar100", "--small", cwd=work)
    assert again.code == 0 and "kd table [" not in again.stdout, again.stderr[-2000:]
    stopped = out / "runs" / "wrn_40_2_wrn_16_2" / "none" / "seed-0"
    (stopped / "summary.json").write_text(json.dumps({**summary(stopped), "status": "interrupted"}))
    other = kd_here("table", "cifar100", "--small", "optim.lr=0.5", cwd=work)  # would mix two settings in one table
    assert_one_line_error(other, "holds a table run with other overrides", "optim.lr=0.5")
    assert summary(stopped)["status"] == "interrupted"
    resumed = kd("table", "cifar100", "--small", cwd=work)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert "kd table [1/1] wrn_40_2_wrn_16_2 none: kd distill resume=" in resumed.stdout
    assert summary(stopped)["status"] == "complete"


def test_report_only_tabulates_and_says_so_when_there_is_nothing(small_table, tmp_path):
    out, _ = small_table
    report = kd_here("table", "cifar100", "--small", "--report", f"out={out}", "methods=kd", cwd=tmp_path)
    assert report.code == 0 and "kd table [" not in report.stdout
    with open(out / "table.csv") as handle:
        assert {r["method"] for r in csv.DictReader(handle)} == {"teacher", "kd"}
    empty = kd_here("table", "cifar100", "--report", f"out={tmp_path / 'none'}", cwd=tmp_path)
    assert_one_line_error(empty, "no complete run in", "without --report first")
    ignored = kd_here("table", "cifar100", "--small", "--report", f"out={out}", "optim.lr=0.5", cwd=tmp_path)
    assert_one_line_error(ignored, "--report only tabulates", "optim.lr=0.5 would change nothing")


def test_a_bad_override_is_refused_even_when_every_cell_is_complete(small_table):
    """A finished table rerun with an override no run would take is still refused (it was accepted in
    silence: nothing was left to run)."""
    out, _ = small_table
    result = kd_here("table", "cifar100", "--small", "trainer.epochs=0", cwd=out.parents[2])
    assert_one_line_error(result, "trainer.epochs=0 must be in [1, 1000000]", "no run was started")


def test_a_sweep_stopped_before_its_first_job_is_resumed_not_refused(tmp_path):
    """A cell folder holding only the sweep's record (stopped before its first job began) is resumed;
    starting it again as a new sweep was refused, and the advice looped."""
    spec = load_recipe("cifar100")
    pair = spec.pairs["resnet56_resnet20"]
    sweep = tmp_path / "runs" / pair.name / "kd"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    assert cell_job(spec, pair, "kd", tmp_path, [], needs_teacher=True)[1] == ["distill", f"resume={sweep}"]


def test_counts_and_tolerances_are_bounded_and_checked_first(tmp_path):
    """A count typed with too many digits is one line at once (it used to hang --report)."""
    for word, fragment in (
        ("seeds=100000000000", "seeds=100000000000 must be a whole number from 1 to 1000"),
        ("seeds=0", "from 1 to 1000"),
        ("tolerance=nan", "tolerance=nan must be a number from 0 to 100"),
        ("tolerance=-1", "from 0 to 100"),
    ):
        assert_one_line_error(kd_here("table", "cifar100", word, "--report", cwd=tmp_path), fragment)


def test_a_bad_override_is_one_line_before_any_run(tmp_path):
    """Every job of the grid is composed and checked first: the override all of them would refuse is
    said once, and nothing is trained or written."""
    for override, fragment in (
        ("trainer.epochs=0", "trainer.epochs=0 must be in [1, 1000000]"),
        ("trainer.epochz=1", "trainer.epochz is not an option (did you mean trainer.epochs?)"),
        ("method.temperature=-2", "method.temperature"),
    ):
        result = kd_here("table", "cifar100", "--small", override, cwd=tmp_path)
        line = assert_one_line_error(result, fragment, "no run was started")
        assert "resume" not in line and "kd table [" not in result.stdout
    assert not (tmp_path / "outputs" / "table" / "cifar100-small" / "teachers").exists()


def test_kill_9_of_the_table_stops_the_teacher_it_trains(tmp_path):
    """The table's children go through the one mechanism that stops a child with its parent: after
    kill -9 of kd table, its kd train-teacher does not train on (racing a rerun for the lock)."""
    import signal
    import subprocess

    from kdrun import start_kd, wait_for

    from kd_cli.engine.rundir import run_status

    long = ["trainer.epochs=200", "trainer.max_steps_per_epoch=1", "trainer.eval_every=200", "trainer.progress=none"]
    table = start_kd("table", "cifar100", "--small", *long, "trainer.num_workers=0", cwd=tmp_path)
    teacher = tmp_path / "outputs" / "table" / "cifar100-small" / "teachers" / "resnet56"
    wait_for(lambda: (teacher / "checkpoints" / "last.pt").exists(), table)
    table.send_signal(signal.SIGKILL)
    table.wait()
    wait_for(lambda: subprocess.run(["pgrep", "-f", str(teacher)], capture_output=True).stdout == b"")
    assert run_status(teacher) == "interrupted"


def test_out_is_a_folder_of_the_tables_own(small_table, tmp_path):
    """out= a run directory, or a folder of other files (a data set's class folders took runs/ and teachers/
    as two more classes): one line before anything is written."""
    out, _ = small_table
    run = out / "teachers" / "resnet56"
    (tmp_path / "photos" / "cats").mkdir(parents=True)
    for target, fragment in (
        (run, "is inside the run or sweep folder"),
        (tmp_path / "photos", "holds other files (cats)"),
    ):
        before = sorted(p.name for p in target.iterdir())
        result = kd_here("table", "cifar100", "--small", f"out={target}", cwd=tmp_path)
        assert_one_line_error(result, fragment)
        assert sorted(p.name for p in target.iterdir()) == before


def test_the_grid_says_each_warning_once_and_names_a_failed_runs_reason(small_table, tmp_path):
    out, result = small_table
    warnings = [line for line in result.stderr.splitlines() if line.startswith("kd: warning: ")]
    assert len(warnings) == len(set(warnings))
    failing = kd(  # the real grid without its data: every run fails as it loads it
        "table",
        "cifar100",
        "pairs=resnet56_resnet20",
        "methods=kd",
        "seeds=1",
        f"out={tmp_path / 't'}",
        f"paths.data={tmp_path / 'nothing'}",
        cwd=tmp_path,
    )
    line = assert_one_line_error(failing, "of the grid's runs failed", "CIFAR-100 not found")
    assert "without --report" not in line


def test_ctrl_c_of_the_table_is_one_line_saying_how_to_resume(tmp_path):
    import signal

    from kdrun import start_kd, wait_for

    long = ["trainer.epochs=200", "trainer.max_steps_per_epoch=1", "trainer.eval_every=200", "trainer.progress=none"]
    table = start_kd("table", "cifar100", "--small", *long, "trainer.num_workers=0", cwd=tmp_path)
    teacher = tmp_path / "outputs" / "table" / "cifar100-small" / "teachers" / "resnet56"
    wait_for(lambda: (teacher / "checkpoints" / "last.pt").exists(), table)
    table.send_signal(signal.SIGINT)
    _, stderr = table.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert table.returncode == 130 and len(lines) == 1, lines
    assert "interrupted while teacher resnet56 ran" in lines[0] and "same kd table command again" in lines[0]


def test_the_cityscapes_table_sets_kd_beside_cirkds_figures_on_its_recipe(compose_config):
    pytest.importorskip("segmentation_models_pytorch")
    spec = load_recipe("cityscapes_segmentation")
    assert (
        spec.metric == "miou"
        and spec.compare == "best"
        and set(spec.methods) == {"none", "skd", "ifvd", "cwd", "cirkd"}
    )
    cited = {figure.source for cells in spec.published.values() for figure in cells.values()}
    assert cited == {"cirkd"} and cited <= set(spec.sources)
    assert spec.figure("cirkd", "deeplabv3_resnet101_deeplabv3_resnet18").score == 76.38
    assert spec.figure("skd", "deeplabv3_resnet101_pspnet_resnet18") is None  # not published for that pair
    for pair_name, student in (
        ("deeplabv3_resnet101_deeplabv3_resnet18", "smp/deeplabv3"),
        ("deeplabv3_resnet101_pspnet_resnet18", "smp/pspnet"),
    ):
        cfg = compose_config("distill", *method_recipe(spec, spec.pairs[pair_name], "cirkd"))
        assert cfg.dataset.name == "cityscapes" and cfg.dataset.stream and cfg.trainer.epochs == 215
        assert (cfg.teacher.arch, cfg.student.arch, cfg.student.kwargs.encoder) == (
            "deeplabv3_resnet101",
            student,
            "resnet18",
        )
        assert cfg.optim.schedule == "poly" and cfg.optim.lr == 0.02 and cfg.method.name == "cirkd"
