"""A run directory is never lost, mixed up or misreported by `kd report` and `kd reproduce`.

In-process, on small run directories written here by hand: one run with a broken or unreadable file
is left out of `kd report` (and `--plot`) with one warning line naming the file and the problem,
never shown under a wrong setting and never a traceback; a missing optional file is normal; a run
that says `running` while nobody holds its lock is `stale`. `kd reproduce` on a run with a broken
saved file is one line and starts nothing. One subprocess test: a `kd reproduce` stopped with
SIGTERM stops its child too, which records `interrupted`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kdrun import FAST

from kd_cli import cli
from kd_cli.commands.report import discover
from kd_cli.engine.lock import DirectoryLock
from kd_cli.errors import KdError

HYDRA_CHOICES = {"method": "kd", "dataset": "digits", "student": "default", "teacher": "default"}
METRICS_CSV = "epoch,train_loss,test_top1\n1,0.9,70.0\n2,0.5,80.0\n"
# (file, content that is there but broken, what the one line says about it)
BROKEN = [
    (".hydra/overrides.yaml", "- method.temperature=8\n- [seed=0\n", "is not valid YAML (line 3"),
    (".hydra/overrides.yaml", "", "is empty"),
    (".hydra/overrides.yaml", "method.temperature: 8\n", "holds a mapping, not a list"),
    (".hydra/hydra.yaml", "hydra: {runtime: [\n", "is not valid YAML"),
    (".hydra/hydra.yaml", "hydra:\n  job: {}\n", "is not Hydra's record of the run (no hydra.runtime.choices"),
    ("config_resolved.yaml", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not text (byte 0x89 at offset 0)"),
    ("summary.json", '{"status": "complete", "best_top1": ', "is not valid JSON (line 1, column 37: Expecting value)"),
    ("summary.json", "[1, 2]", "holds a list, not an object"),
    ("summary.json", '{"status": "complete", "best_top1": NaN}', "is not valid JSON (NaN is not JSON"),
    ("summary.json", '{"status": "complete", "wall_time_s": Infinity}', "is not valid JSON (Infinity is not JSON"),
    ("summary.json", '{"status": "complete", "best_top1": 1e308}', "has best_top1=1e+308, not a percentage"),
    ("summary.json", '{"status": "complete", "last_top1": -5}', "has last_top1=-5, not a percentage"),
    ("summary.json", '{"status": "complete", "params": "many"}', "has params='many', not a count"),
    ("metrics.csv", bytes(range(256)), "is not text"),
    ("metrics.csv", "no commas here\njust text\n", "has no epoch column"),
    ("reproduce.json", "{", "is not valid JSON"),
]


def write_run(
    path: Path,
    temperature: float = 4,
    seed: int = 0,
    status: str = "complete",
    best: float = 80.0,
    cwd: Path | None = None,
    stage: str = "distill",
    overrides: list[str] | None = None,
) -> Path:
    """A small run directory with every file kd writes (no model: report and reproduce need none)."""
    if overrides is None:
        overrides = [f"method.temperature={temperature}", f"seed={seed}"]
    config = {"stage": stage, "seed": seed, "paths": {"outputs": "outputs", "data": "data"}, "trainer": {"epochs": 2}}
    if stage == "distill":
        config["method"] = {"name": "kd", "temperature": temperature}
    hydra = {
        "hydra": {
            "runtime": {"choices": HYDRA_CHOICES, "cwd": str(cwd or path.parent)},
            "job": {"config_name": stage.replace("-", "_")},
        }
    }
    files = {
        ".hydra/overrides.yaml": yaml.safe_dump(overrides),
        ".hydra/config.yaml": yaml.safe_dump(config),
        ".hydra/hydra.yaml": yaml.safe_dump(hydra),
        "config_resolved.yaml": yaml.safe_dump(config),
        "summary.json": json.dumps({"status": status, "stage": stage, "best_top1": best, "last_top1": best}),
        "env.json": json.dumps({"seed": seed, "data_fingerprint": "abc"}),
        "metrics.csv": METRICS_CSV,
    }
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def break_file(run: Path, name: str, content: str | bytes) -> None:
    target = run / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture
def runs(tmp_path) -> Path:
    """outputs/: temperature 1 and 4, two seeds each, all complete."""
    root = tmp_path / "outputs"
    for temperature in (1, 4):
        for seed in (0, 1):
            write_run(root / f"t{temperature}-s{seed}", temperature, seed, best=70.0 + temperature + seed)
    return root


def kd_main(capsys, *args: str) -> tuple[int, str, list[str]]:
    """`kd ARGS` in this process: (exit code, stdout, the non-empty stderr lines)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, [line for line in err.splitlines() if line.strip()]


def table_rows(stdout: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unreadable(monkeypatch, path: Path) -> None:
    """Make `path` unreadable to kd: by its mode, or (as root, whom modes do not stop) by refusing the read."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real = discover._read_bytes

    def read(target: Path) -> bytes:
        if Path(target).resolve() == path.resolve():
            raise PermissionError(13, "Permission denied", str(target))
        return real(target)

    monkeypatch.setattr(discover, "_read_bytes", read)


# --- kd report ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,problem", BROKEN, ids=[f"{n}:{p[:14]}" for n, _, p in BROKEN])
def test_a_broken_file_leaves_its_run_out_with_one_warning(runs, tmp_path, capsys, monkeypatch, name, content, problem):
    monkeypatch.chdir(tmp_path)
    bad = write_run(runs / "t8-s0", 8, 0, best=99.0)
    break_file(bad, name, content)
    before = snapshot(runs)
    for extra in ([], ["--plot", "plots"]):
        # The broken run is reached twice (its folder and its own path): still one warning.
        code, out, err = kd_main(capsys, "report", str(runs), str(bad), *extra)
        assert code == 0, err
        assert len(err) == 1 and err[0].startswith(f"kd: warning: left out outputs/t8-s0: its {name} {problem}"), err
        rows = table_rows(out)  # never a row of its own, never counted in another
        assert [row[0] for row in rows] == ["1", "4"] and all(row[-1] == "2 complete" for row in rows)
        assert "4 runs in 2 settings" in out
        assert f"broken, left out: outputs/t8-s0  ({name} {problem}" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "best_top1_vs_method.temperature.png",
        "curves_test_top1.png",
        "curves_train_loss.png",
    ]
    assert snapshot(runs) == before  # report reads, never writes


def test_an_unreadable_file_shows_as_unreadable(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locked = runs / "t4-s1" / "summary.json"
    unreadable(monkeypatch, locked)
    code, out, err = kd_main(capsys, "report", "outputs")
    assert code == 0
    assert err == ["kd: warning: left out outputs/t4-s1: its summary.json cannot be read (permission denied)"]
    assert "unreadable, left out: outputs/t4-s1" in out and "unknown" not in out
    assert [row[-1] for row in table_rows(out)] == ["2 complete", "1 complete"]


def test_missing_optional_files_keep_the_run(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    young = runs / "t4-s1"
    for name in ("metrics.csv", "env.json", ".hydra/hydra.yaml"):  # no epoch yet; no reproduce.json either
        (young / name).unlink()
    code, out, err = kd_main(capsys, "report", "outputs", "--plot", "plots")
    assert code == 0 and err == []
    assert [row[-1] for row in table_rows(out)] == ["2 complete", "2 complete"]


def test_every_run_left_out_is_one_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        break_file(write_run(tmp_path / "outputs" / f"s{seed}", seed=seed), ".hydra/overrides.yaml", "- [")
    code, out, err = kd_main(capsys, "report", "outputs")
    assert code == 2 and out == ""
    assert [line.split(":")[1] for line in err] == [" warning", " warning", " error"]
    assert err[-1] == (
        "kd: error: no readable kd run under outputs: each of the 2 run directories has an "
        "unreadable or broken file (named in the warnings above); fix or move those files"
    )


def test_a_killed_run_is_stale_and_a_live_one_running(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    killed = write_run(runs / "t4-s2", 4, 2, status="running")  # its writer died: nobody holds its lock
    live = write_run(runs / "t4-s3", 4, 3, status="running")
    lock = DirectoryLock.acquire(live, "test")
    try:
        code, out, err = kd_main(capsys, "report", "outputs")
        assert code == 0 and err == []
        assert table_rows(out)[1][-1] == "2 complete, 1 running, 1 stale"
        assert (
            "stale: outputs/t4-s2  (killed: its summary says running but no process holds it; continue it "
            "with kd distill resume=outputs/t4-s2)"
        ) in out
        code, out, err = kd_main(capsys, "report", "outputs", "--where", "status=stale")
        assert code == 0 and [row[-1] for row in table_rows(out)] == ["1 stale"] and "t4-s2" in out
        code, out, err = kd_main(capsys, "report", "outputs", "--where", "status=running")
        assert code == 0 and [row[-1] for row in table_rows(out)] == ["1 running"] and "t4-s3" in out
    finally:
        lock.release()
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"  # told, not rewritten
    assert not (killed / ".kd.lock").exists() and not (live / ".kd.lock").exists()


def test_a_folder_that_cannot_be_searched_is_warned_about(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hidden = runs / "private"
    write_run(hidden / "t9", 9)
    if os.geteuid() != 0:
        hidden.chmod(0)  # put back below
    else:  # root searches every folder: refuse it as the kernel would for anyone else
        real = discover.is_run_dir

        def is_run_dir(path: Path) -> bool:
            if Path(path).resolve() == hidden:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(discover, "is_run_dir", is_run_dir)
    try:
        code, out, err = kd_main(capsys, "report", "outputs")
    finally:
        hidden.chmod(0o755)
    assert code == 0
    assert err == ["kd: warning: cannot search outputs/private (permission denied): any runs in it are left out"]
    assert "4 runs in 2 settings" in out


# --- kd reproduce ---------------------------------------------------------------------------------

REPRODUCE_BROKEN = [
    (".hydra/config.yaml", "stage: [distill\n", "is not valid YAML"),
    (
        ".hydra/overrides.yaml",
        "- method.temperature=4\n- {seed: 0}\n",
        "holds something other than a list of overrides",
    ),
    (".hydra/overrides.yaml", "- [method", "is not valid YAML"),
    (".hydra/hydra.yaml", "- just a list\n", "holds a list, not a mapping"),
    ("config_resolved.yaml", "seed: 0\n\tmethod: kd\n", "is not valid YAML"),
    ("summary.json", b"\x00\x00\x00\x00", "is not valid JSON"),
    ("env.json", "{'seed': 0}", "is not valid JSON (line 1, column 2"),
    ("metrics.csv", "epoch,top1\n1,50,extra\n", "line 2 has more cells than the header"),
]


@pytest.mark.parametrize(
    "name,content,problem", REPRODUCE_BROKEN, ids=[f"{n}:{p[:14]}" for n, _, p in REPRODUCE_BROKEN]
)
def test_reproduce_of_a_broken_run_is_one_line_and_starts_nothing(
    tmp_path, capsys, monkeypatch, name, content, problem
):
    monkeypatch.chdir(tmp_path)
    run = write_run(tmp_path / "project" / "run", cwd=tmp_path / "project")
    break_file(run, name, content)
    before = snapshot(tmp_path)
    code, out, err = kd_main(capsys, "reproduce", str(run))
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith(f"kd: error: cannot reproduce {run}: its {name} {problem}"), err
    assert err[0].endswith("; the run's record is damaged (nothing was started)")
    assert snapshot(tmp_path) == before and not (tmp_path / "project" / "outputs").exists()


def test_reproduce_of_an_unreadable_or_killed_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = write_run(tmp_path / "project" / "run", cwd=tmp_path / "project")
    with monkeypatch.context() as patch:
        unreadable(patch, run / "env.json")
        code, out, err = kd_main(capsys, "reproduce", str(run))
    (run / "env.json").chmod(0o644)
    assert code == 2 and err == [
        f"kd: error: cannot reproduce {run}: its env.json cannot be read (permission denied); "
        f"get read access to it (nothing was started)"
    ]
    write_run(run, status="running")  # killed: nobody holds its lock
    code, out, err = kd_main(capsys, "reproduce", str(run))
    assert code == 2 and err == [
        f"kd: error: {run} is stale, not complete: it has no final metrics to compare with; "
        f"finish it first (kd distill resume={run})"
    ]
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["run"]


def test_reproduce_of_a_training_run_without_its_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = write_run(tmp_path / "project" / "run", cwd=tmp_path / "project")
    (run / "metrics.csv").unlink()
    code, out, err = kd_main(capsys, "reproduce", str(run))
    assert code == 2 and len(err) == 1 and "its metrics.csv is missing" in err[0] and "nothing was started" in err[0]
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["run"]


def test_reproduce_reads_a_run_without_its_optional_files(tmp_path):
    from kd_cli.commands.reproduce import load_saved_run

    run = write_run(tmp_path / "run")
    for name in ("env.json", ".hydra/hydra.yaml", "metrics.csv"):
        (run / name).unlink()
    saved = load_saved_run(str(run))
    assert (saved.env, saved.hydra, saved.metrics, saved.status) == ({}, {}, [], "complete")
    assert saved.overrides == ["method.temperature=4", "seed=0"]


def teacher_run(path: Path, cwd: Path) -> Path:
    """A finished train-teacher run as kd reproduce reads it. Its saved config is not kd's whole config:
    the differences are listed, which does not matter here."""
    return write_run(
        path, stage="train-teacher", cwd=cwd, overrides=[*FAST, "trainer.max_steps_per_epoch=2", "trainer.epochs=1"]
    )


@pytest.mark.parametrize("child", ["refused", "interrupted"])
def test_a_reproduction_that_never_starts_leaves_no_directory(tmp_path, capsys, monkeypatch, child):
    """The child kd refused its arguments, or was stopped while starting: only reproduce.json is there."""
    from kd_cli.commands import reproduce
    from kd_cli.engine import process

    def run_child(args, cwd=None, capture_stderr=True):
        if child == "interrupted":
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(args, 2, None, "kd: error: trainer.epochs=0 must be >= 1\n")

    monkeypatch.setattr(process, "run_child", run_child)
    saved = reproduce.load_saved_run(str(teacher_run(tmp_path / "original", cwd=tmp_path)))
    for started in (False, True):
        run_dir = reproduce.new_run_dir(saved, None, [])
        reproduce.record(run_dir, reproduces=str(saved.path))
        if started:
            (run_dir / "summary.json").write_text('{"status": "failed"}')
        expected = KeyboardInterrupt if child == "interrupted" else KdError
        with pytest.raises(expected) as raised:
            reproduce.run_stage(saved, ["python", "-m", "kd_cli", "train-teacher"], run_dir)
        out = capsys.readouterr().out
        assert run_dir.exists() == started
        if child == "refused":
            where = f"run directory {run_dir}" if started else "it wrote nothing"
            assert str(raised.value) == f"the reproduction failed: trainer.epochs=0 must be >= 1 ({where})"
        else:
            where = (
                f"its run directory {run_dir} keeps what the run recorded"
                if started
                else "it had not started: nothing kept"
            )
            assert f"reproduction interrupted; {where}" in out
    assert [p.name for p in (tmp_path / "outputs" / "reproduce").glob("*/*")] == [run_dir.name]


# --- a stopped kd reproduce stops its child -------------------------------------------------------


def command_lines() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform == "win32", reason="needs /proc and POSIX signals")
def test_sigterm_to_reproduce_stops_its_child(tmp_path):
    # The rerun is made long (overrides given to kd reproduce come after the saved ones) so that it is
    # still training when it is stopped.
    teacher_run(tmp_path / "original", cwd=tmp_path)
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as out, open(err_file, "w") as err:  # files, not pipes: nothing blocks on a full pipe
        process = subprocess.Popen(
            [sys.executable, "-m", "kd_cli", "reproduce", "original", "trainer.epochs=100000"],
            cwd=tmp_path,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        checkpoints: list[Path] = []
        give_up = time.monotonic() + 600  # a safety net against a hung test, not a timing under test
        while not checkpoints and process.poll() is None and time.monotonic() < give_up:
            time.sleep(0.2)
            checkpoints = list((tmp_path / "outputs" / "reproduce").glob("*/*/checkpoints/last.pt"))
        assert checkpoints, (
            f"no checkpoint of the rerun:\n{out_file.read_text()[-3000:]}\n{err_file.read_text()[-3000:]}"
        )
        child_dir = checkpoints[0].parent.parent
        assert any(str(child_dir) in line for line in command_lines())  # the child is training
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:  # the test failed: stop it the way that also stops its child
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    out, err = out_file.read_text(), err_file.read_text()
    assert process.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("kd: error: interrupted")
    assert "Traceback" not in err
    assert f"reproduction interrupted; its run directory {child_dir} keeps what the run recorded" in out
    assert not any(str(child_dir) in line for line in command_lines())  # no orphan training on
    summary = json.loads((child_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    facts = json.loads((child_dir / "reproduce.json").read_text())
    assert facts["reproduces"] == str(tmp_path / "original") and "identical" not in facts  # written before only
    assert not (child_dir / ".kd.lock").exists()
