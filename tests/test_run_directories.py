"""A run directory can be trusted: one writer, a resume that does not change the run, a status that
is true however the run stopped, files a teammate can read, and every bad value refused before any
work. Each case asserts the one-line message, the exit code and what is left on disk.

Most cases run `kd` in this process (`kd_here`); the ones about processes (two writers, signals,
kill -9, umask, a full disk) run the real command in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kdrun import FAST, Result, assert_one_line_error, kd_here, kd_here_ok, start_kd, summary, wait_for

SMALL = [*FAST, "trainer.max_steps_per_epoch=2", "trainer.eval_batch_size=512"]
# A run long enough to be stopped in the middle (100 one-batch epochs, evaluated once at the end), short
# enough to resume in a second.
LONG = [*FAST, "trainer.epochs=100", "trainer.max_steps_per_epoch=1", "trainer.eval_every=100"]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time: 'unchanged' means unchanged byte for byte."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(run: Path) -> list[str]:
    """Files a finished (or stopped) run must not keep: locks, reserves, temporary files."""
    return [str(p.relative_to(run)) for p in run.rglob(".*") if p.is_file() and p.parent.name != ".hydra"]


def has_checkpoint(run: Path):
    return lambda: (run / "checkpoints" / "last.pt").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A complete teacher run on the real digits data (2 short epochs)."""
    home = tmp_path_factory.mktemp("finished")
    run = home / "teacher"
    kd_here_ok("train-teacher", "trainer.epochs=2", *SMALL, f"hydra.run.dir={run}", cwd=home)
    return run


@pytest.fixture
def stopped(tmp_path) -> Path:
    """A real interrupted run: Ctrl-C after its first checkpoint."""
    run = tmp_path / "stopped"
    process = start_kd("train-teacher", *LONG, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(has_checkpoint(run), process)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130 and summary(run)["status"] == "interrupted"
    return run


# --- one writer per run directory -----------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_runs_and_the_first_finishes_intact(tmp_path):
    run = tmp_path / "run"
    first = start_kd("train-teacher", "trainer.epochs=3", "seed=0", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(lambda: (run / "summary.json").exists(), first)
    first.send_signal(signal.SIGSTOP)  # frozen while it holds the directory: the others must not get in
    try:
        second = kd_here("train-teacher", "trainer.epochs=3", "seed=1", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
        assert_one_line_error(second, "being written by another kd process", f"pid {first.pid}")
        third = kd_here("train-teacher", f"resume={run}", cwd=tmp_path)
        assert_one_line_error(third, "still being written", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert summary(run)["status"] == "complete" and summary(run)["seed"] == 0
    assert "seed=1" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert leftovers(run) == []


def test_the_lock_names_its_owner_and_dies_with_it(tmp_path):
    from kd_cli.engine.lock import DirectoryLock, holder

    lock = DirectoryLock.acquire(tmp_path, "wait")
    lock.record_owner()  # (a run records itself when it starts writing)
    assert holder(tmp_path).pid == os.getpid()
    line = assert_one_line_error(
        kd_here("train-teacher", *SMALL, f"hydra.run.dir={tmp_path}", cwd=tmp_path),
        "being written by another kd process",
        f"pid {os.getpid()}",
    )
    assert "wait for it to finish" in line
    lock.release()
    assert holder(tmp_path) is None and not (tmp_path / ".kd.lock").exists()


@pytest.mark.parametrize("spelling", ["hydra.run.dir", "+hydra.run.dir", "++hydra.run.dir"])
def test_a_finished_run_is_never_written_again(finished, tmp_path, spelling):
    before = snapshot(finished)
    result = kd_here("train-teacher", "seed=3", *SMALL, f"{spelling}={finished}", cwd=tmp_path)
    assert_one_line_error(result, "already holds a run", f"resume={finished}")
    assert_one_line_error(kd_here("train-teacher", f"resume={finished}", cwd=tmp_path), "already complete")
    assert snapshot(finished) == before


def test_a_new_run_never_goes_into_a_folder_that_holds_other_runs(finished, tmp_path):
    """hydra.run.dir naming the outputs folder itself (full of runs): refused in one line, nothing written
    there (a run written into outputs/ hid every other run from kd report)."""
    outputs = finished.parent  # the folder that holds the finished run
    before = snapshot(outputs)
    result = kd_here("train-teacher", *SMALL, f"hydra.run.dir={outputs}", cwd=tmp_path)
    assert_one_line_error(result, f"{outputs} holds other runs ({finished})", "a run needs a folder of its own")
    assert snapshot(outputs) == before


def test_a_run_never_goes_inside_another_run_or_a_sweep(finished, tmp_path):
    sweep = tmp_path / "sweep"
    assert (
        kd_here(
            "train-teacher", "-m", "seed=0", "trainer.epochs=1", *SMALL, f"hydra.sweep.dir={sweep}", cwd=tmp_path
        ).code
        == 0
    )
    before = snapshot(finished)
    cases = [
        (["train-teacher", f"hydra.run.dir={finished / 'sub'}"], f"inside the run directory {finished}"),
        (["train-teacher", f"hydra.run.dir={sweep}"], "holds a sweep"),
        (["train-teacher", f"hydra.run.dir={sweep / 'extra'}"], f"inside the sweep folder {sweep}"),
        (["train-teacher", "-m", "seed=1", f"hydra.sweep.dir={finished}"], "another run or sweep"),
        (["train-teacher", "-m", "seed=1", f"hydra.sweep.dir={sweep / '0'}"], "another run or sweep"),
    ]
    for args, fragment in cases:
        assert_one_line_error(kd_here(args[0], *SMALL, *args[1:], cwd=tmp_path), fragment)
    assert snapshot(finished) == before and not (finished / "sub").exists() and not (sweep / "extra").exists()


def test_a_finished_run_removes_only_its_own_temporary_files(tmp_path):
    """A killed writer's temporary files are cleaned from the run's own folders; a user's file that
    merely looks like one, in a folder of their own inside the run directory, is left alone."""
    run = tmp_path / "run"
    (run / "notes").mkdir(parents=True)
    (run / "notes" / ".draft.tmp").write_text("mine")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".last.pt.x1y2.tmp").write_text("left by a killed writer")
    assert kd_here("train-teacher", "trainer.epochs=1", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path).code == 0
    assert (run / "notes" / ".draft.tmp").read_text() == "mine"
    assert (
        not (run / "checkpoints" / ".last.pt.x1y2.tmp").exists()
        and leftovers(run) == [".draft.tmp"]
        or leftovers(run) == ["notes/.draft.tmp"]
    )


def test_every_job_of_a_sweep_is_checked_before_the_first_runs(finished, tmp_path):
    sweep = tmp_path / "sweep"
    result = kd_here(
        "distill",
        "-m",
        "optim.lr=0.1,nan",
        f"teacher.checkpoint={finished}",
        *SMALL,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "job 1 of the sweep", "optim.lr=nan must be a finite number", "no job was run")
    assert not sweep.exists()
    # a value Hydra cannot compose (an unknown group option, a wrong type) is refused the same way, not
    # called a folder that cannot be created nor left to a warning from inside Hydra's callback
    for swept, fragment in (
        ("method=kd,kdd", "Could not find 'method/kdd'"),
        ("seed=0,abc", "seed=abc is not accepted"),
    ):
        result = kd_here(
            "distill", "-m", swept, f"teacher.checkpoint={finished}", *SMALL, f"hydra.sweep.dir={sweep}", cwd=tmp_path
        )
        assert_one_line_error(result, "job 1 of the sweep", fragment, "no job was run")
        assert not sweep.exists()


def test_a_sweep_folder_holding_runs_is_refused_unless_resumed(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["train-teacher", "-m", "seed=0,1", "trainer.epochs=1", *SMALL, f"hydra.sweep.dir={sweep}"]
    assert kd_here(*args, cwd=tmp_path).code == 0
    jobs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(jobs) == 2 and all(summary(job)["status"] == "complete" for job in jobs)
    before = {job: snapshot(job) for job in jobs}
    other = kd_here(
        "train-teacher",
        "-m",
        "optim.lr=0.05,0.01",
        "trainer.epochs=1",
        *SMALL,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert_one_line_error(other, "already holds a sweep's runs", f"resume={sweep}")
    assert {job: snapshot(job) for job in jobs} == before
    # resume=SWEEP: finished jobs are kept as they are, a stopped one continues
    status = json.loads((jobs[1] / "summary.json").read_text())
    (jobs[1] / "summary.json").write_text(json.dumps({**status, "status": "interrupted"}))
    assert kd_here("train-teacher", f"resume={sweep}", cwd=tmp_path).code == 0
    assert snapshot(jobs[0]) == before[jobs[0]]
    assert summary(jobs[1])["status"] == "complete" and len(summary(jobs[1])["resumes"]) == 1


def test_a_resumed_sweep_keeps_its_job_folders_and_hydra_settings(tmp_path):
    """A sweep started with hydra.sweep.subdir=seed-${seed} continues in those folders (its Hydra overrides,
    the launcher's too, are carried like its own), not in new numbered ones beside them."""
    sweep = tmp_path / "sweep"
    args = [
        "train-teacher",
        "-m",
        "seed=0,1",
        "trainer.epochs=1",
        *SMALL,
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=seed-${seed}",
    ]
    assert kd_here(*args, cwd=tmp_path).code == 0
    status = json.loads((sweep / "seed-1" / "summary.json").read_text())
    (sweep / "seed-1" / "summary.json").write_text(json.dumps({**status, "status": "interrupted"}))
    assert kd_here("train-teacher", f"resume={sweep}", cwd=tmp_path).code == 0
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["seed-0", "seed-1"]
    assert summary(sweep / "seed-1")["status"] == "complete" and len(summary(sweep / "seed-1")["resumes"]) == 1


def test_a_resumed_sweep_runs_a_job_that_was_refused_before_it_started(tmp_path):
    """Job 1 needs MNIST, which is not there yet: it is refused before it starts (its folder says so,
    for launchers that run jobs elsewhere) and the sweep exits non-zero. Once the files are there,
    resume=SWEEP keeps job 0 as it is and runs job 1."""
    import numpy as np
    from formats import write_mnist_raw

    sweep, data = tmp_path / "sweep", tmp_path / "data"
    args = [
        "train-teacher",
        "-m",
        "dataset=digits,mnist",
        "trainer.epochs=1",
        *SMALL,
        f"paths.data={data}",
        f"hydra.sweep.dir={sweep}",
    ]
    assert_one_line_error(kd_here(*args, cwd=tmp_path), "MNIST not found")
    assert summary(sweep / "0")["status"] == "complete"
    assert summary(sweep / "1")["status"] == "failed" and summary(sweep / "1")["started_run"] is False
    before = snapshot(sweep / "0")
    rng = np.random.default_rng(0)
    write_mnist_raw(
        data, rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), (np.arange(300) % 10).astype(np.uint8), n_train=200
    )
    assert kd_here("train-teacher", f"resume={sweep}", cwd=tmp_path).code == 0
    assert snapshot(sweep / "0") == before and summary(sweep / "1")["status"] == "complete"


# --- a resume does not change what the run is ----------------------------------------------------


def test_resume_with_changed_settings_is_refused_by_name_and_the_run_is_unchanged(stopped, tmp_path):
    before = snapshot(stopped)
    line = assert_one_line_error(
        kd_here("train-teacher", f"resume={stopped}", "optim.lr=0.5", "seed=7", cwd=tmp_path),
        "optim.lr=0.5",
        "seed=7",
        "the run has",
    )
    assert "start a new run" in line
    longer = kd_here("train-teacher", f"resume={stopped}", "trainer.epochs=150", cwd=tmp_path)
    assert_one_line_error(longer, "trainer.epochs=150", "resume_extend=true")
    assert snapshot(stopped) == before  # nothing written: the plain resume below still works
    fewer = kd_here("train-teacher", f"resume={stopped}", "trainer.epochs=0", "resume_extend=true", cwd=tmp_path)
    assert_one_line_error(fewer, "trainer.epochs")
    assert snapshot(stopped) == before
    # the same settings typed again, or a free one (progress), are not changes
    assert (
        kd_here("train-teacher", f"resume={stopped}", "trainer.epochs=100", "trainer.progress=none", cwd=tmp_path).code
        == 0
    )
    done = summary(stopped)
    assert done["status"] == "complete" and done["epochs"] == 100
    assert done["resumes"][0]["changes"] == ["trainer.progress=none"] and leftovers(stopped) == []


def test_resume_extend_trains_the_same_run_longer_and_says_so(finished, tmp_path):
    run = tmp_path / "extended"
    shutil.copytree(finished, run)
    done = summary(run)
    (run / "summary.json").write_text(json.dumps({**done, "status": "interrupted"}))
    assert kd_here("train-teacher", f"resume={run}", "trainer.epochs=3", "resume_extend=true", cwd=tmp_path).code == 0
    extended = summary(run)
    assert extended["status"] == "complete" and extended["epochs"] == 3
    assert extended["resumes"][-1]["changes"] == ["trainer.epochs=3"]
    assert "resume_extend: true" in (run / "config_resolved.yaml").read_text()


def test_a_resumed_run_must_see_the_same_config_and_data(stopped, tmp_path):
    """What the saved config says is what ran: if kd's defaults (or a config file) changed since the
    run started, or its data did, resuming would make it a mix; it is refused, and nothing is written."""
    config = (stopped / "config_resolved.yaml").read_text()
    (stopped / "config_resolved.yaml").write_text(config.replace("lr: 0.05", "lr: 0.07"))
    before = snapshot(stopped)
    assert_one_line_error(
        kd_here("train-teacher", f"resume={stopped}", cwd=tmp_path), "resolves differently", "optim.lr: 0.07 -> 0.05"
    )
    assert snapshot(stopped) == before
    (stopped / "config_resolved.yaml").write_text(config)
    env = json.loads((stopped / "env.json").read_text())
    (stopped / "env.json").write_text(json.dumps({**env, "data_fingerprint": "0123456789abcdef"}))
    before = snapshot(stopped)
    assert_one_line_error(
        kd_here("train-teacher", f"resume={stopped}", cwd=tmp_path), "data differ", "0123456789abcdef"
    )
    assert snapshot(stopped) == before
    (stopped / "env.json").write_text(json.dumps(env))
    assert kd_here("train-teacher", f"resume={stopped}", cwd=tmp_path).code == 0
    resumed_env = json.loads((stopped / "env.json").read_text())
    assert resumed_env["earlier"] == [env]  # the first part's environment is kept beside the new one


# --- a run's status is true ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_records_interrupted_and_leaves_no_temporary_file(tmp_path, sig):
    run = tmp_path / "run"
    process = start_kd("train-teacher", *LONG, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(has_checkpoint(run), process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "resume=" in stderr and "Traceback" not in stderr
    assert summary(run)["status"] == "interrupted" and leftovers(run) == []


def test_kill_9_leaves_a_stale_run_that_resume_continues(tmp_path):
    from kd_cli.engine.rundir import run_status

    run = tmp_path / "run"
    process = start_kd("train-teacher", *LONG, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(has_checkpoint(run), process)
    assert run_status(run) == "running"
    process.kill()
    process.wait()
    assert summary(run)["status"] == "running" and run_status(run) == "stale"
    before = snapshot(run)  # the dead owner's .kd.lock record included
    assert f'"pid": {process.pid}' in (run / ".kd.lock").read_text()
    assert_one_line_error(kd_here("train-teacher", f"resume={run}", "seed=7", cwd=tmp_path), "seed=7")
    assert snapshot(run) == before
    assert kd_here("train-teacher", f"resume={run}", cwd=tmp_path).code == 0
    assert run_status(run) == "complete" and leftovers(run) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_distill_while_it_trains_its_teacher_stops_both_and_resume_keeps_that_teacher(tmp_path, sig):
    """SIGTERM: distill records `interrupted` and stops its teacher's process. kill -9: distill cannot
    record anything (it is `stale`), and its teacher's process notices its parent is gone and stops
    itself. Either way no orphan trains on, and the resume continues that same teacher."""
    from kd_cli.engine.rundir import run_status

    outputs = tmp_path / "outputs"
    run = tmp_path / "distill"
    process = start_kd("distill", *LONG, f"paths.outputs={outputs}", f"hydra.run.dir={run}", cwd=tmp_path)
    teachers = lambda: list((outputs / "train-teacher").glob("*/*/checkpoints/last.pt"))  # noqa: E731
    wait_for(lambda: bool(teachers()), process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    teacher = teachers()[0].parents[1]
    wait_for(lambda: run_status(teacher) != "running")
    assert run_status(teacher) == "interrupted"
    assert run_status(run) == ("interrupted" if sig == signal.SIGTERM else "stale"), stderr
    assert summary(run)["teacher_run"] == str(teacher)
    wait_for(lambda: subprocess.run(["pgrep", "-f", str(teacher)], capture_output=True).stdout == b"")  # no orphan
    kd_here_ok("distill", f"resume={run}", cwd=tmp_path)
    assert [p.parent for p in (outputs / "train-teacher").glob("*/*/summary.json")] == [teacher]  # no second one
    assert summary(teacher)["status"] == "complete" and summary(teacher)["resumes"]
    assert summary(run)["status"] == "complete" and summary(run)["teacher_run"] == str(teacher)


def test_a_failed_checkpoint_write_is_recorded_as_failed(tmp_path):
    """Files larger than the limit cannot be written (as on a full disk): the checkpoint fails, the
    small summary records it."""
    run = tmp_path / "run"

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    process = start_kd(
        "train-teacher", "trainer.epochs=2", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path, preexec_fn=small_files_only
    )
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "cannot write the checkpoint" in stderr, stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1
    done = summary(run)
    assert done["status"] == "failed" and "resume=" in done["error"] and leftovers(run) == []


def test_a_full_disk_still_records_failed(tmp_path, monkeypatch):
    """Even when no new file fits, the space set aside at the start records the failure."""
    from kd_cli.engine import rundir
    from kd_cli.engine.rundir import RESERVE, RunDir

    run = RunDir(tmp_path / "run")
    run.begin(config(), {}, stage="train-teacher")
    assert (run.path / RESERVE).stat().st_size > 0
    real_write = rundir.write_json

    def full_disk(path, data):
        if (run.path / RESERVE).exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(rundir, "write_json", full_disk)
    run.record_stop("failed", "disk full", 1.0)
    assert summary(run.path)["status"] == "failed" and not (run.path / RESERVE).exists()


def config():
    from omegaconf import OmegaConf

    return OmegaConf.create({"stage": "train-teacher"})


def test_a_folder_kd_may_not_write_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: give the folder away and drop root's override of permissions
        os.chown(locked, 65534, 65534)
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    locked.chmod(0o755)
    for args, fragment in (
        (["train-teacher", f"hydra.run.dir={locked / 'run'}"], "Permission denied"),
        (["train-teacher", "-m", "seed=0,1", f"hydra.sweep.dir={locked / 'sweep'}"], "cannot create the sweep folder"),
    ):
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "kd_cli", *args, *SMALL],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert_one_line_error(Result(done.returncode, done.stdout, done.stderr), fragment, str(locked))
    assert list(locked.iterdir()) == []


# --- files follow the umask --------------------------------------------------------------------------


@pytest.mark.parametrize("umask, group_bits", [(0o002, 0o060), (0o077, 0)], ids=["0002", "0077"])
def test_run_files_follow_the_users_umask(finished, tmp_path, umask, group_bits):
    run = tmp_path / "run"
    previous = os.umask(umask)
    try:
        result = kd_here(
            "evaluate", f"run={finished}", "latency_batches=1", *FAST, f"hydra.run.dir={run}", cwd=tmp_path
        )
    finally:
        os.umask(previous)
    assert result.code == 0, result.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
        assert path.stat().st_mode & 0o060 == group_bits
    assert all(p.stat().st_mode & 0o777 == 0o777 & ~umask for p in run.rglob("*") if p.is_dir())


# --- every value checked before any work ---------------------------------------------------------------

BAD_VALUES = [
    (["distill", "student=cnn", "student.kwargs.widht=3"], ["widht", "width"]),
    (["distill", "method.temperature=0"], ["method.temperature=0", "in (0, 1000]"]),
    (["distill", "method.temperature=abc"], ["method.temperature='abc'", "number"]),
    (["distill", "trainer.grad_clip=-1"], ["trainer.grad_clip=-1", "> 0"]),
    (["distill", "optim.lr=nan"], ["optim.lr=nan", "finite"]),
    (["train-teacher", "optim.lr=inf"], ["optim.lr=inf", "finite"]),
    (["train-teacher", "optim.momentum=1.5"], ["optim.momentum=1.5"]),
    (["train-teacher", "optim.min_lr=1"], ["optim.min_lr=1"]),
    (["train-teacher", "trainer.max_steps_per_epoch=0"], ["trainer.max_steps_per_epoch=0"]),
    (["train-teacher", "augmentation.erase_prob=2"], ["augmentation.erase_prob=2"]),
    (["train-teacher", "augmentation.rotate_degrees=nan"], ["augmentation.rotate_degrees=nan"]),
    (["train-teacher", "seed=-1"], ["seed=-1"]),
    (["distill", "teacher.checkpoint=/no/such/teacher"], ["/no/such/teacher"]),
    (["distill", "method=dkd", "method.beta=-1"], ["method.beta=-1"]),
    (["distill", "method=fitnet", "method.fitnet_weight=abc"], ["method.fitnet_weight='abc'"]),
    (["train-teacher", "teacher=cnn", "teacher.kwargs.depth=0"], ["teacher.kwargs.depth=0"]),
    (["train-teacher", "teacher=cnn", "teacher.kwargs.depth=9"], ["depth"]),
    (["train-teacher", "dataset.mean=[nan]"], ["dataset.mean"]),
    (["train-teacher", "+foo=1"], ["unknown option foo"]),
    (["distill", "++trainer.bogus=2"], ["unknown option trainer.bogus"]),
    (["train-teacher", "optim=adamw", "optim.betas=[0.9]"], ["optim.betas=[0.9]", "two numbers"]),
    (["train-teacher", "optim.fused=sometimes"], ["optim.fused=sometimes", "auto, true, false"]),
    (["distill", "trainer.compile=fastest"], ["trainer.compile=fastest", "reduce-overhead"]),
    (["distill", "trainer.epochs=1.5"], ["trainer.epochs=1.5 is not accepted", "a whole number"]),
    (
        ["distill", "-m", "method=at,kd", "method.tuned_input_size=32"],
        ["unknown option method.tuned_input_size of method 'kd'", "no job was run"],
    ),
    (["distill", "teacher_cache.enabled=maybe"], ["teacher_cache.enabled", "true or false"]),
    (["distill", "teacher_cache.max_gb=lots"], ["teacher_cache.max_gb=lots", "a number"]),
    (["distill", "student.checkpoint=/some/weights"], ["student.checkpoint", "not used"]),
    (["train-teacher", "teacher.checkpoint=/some/teacher"], ["teacher.checkpoint=/some/teacher", "ignored"]),
    (["train-teacher", "method.ce_weight=0"], ["method.ce_weight is 0", "nothing would be learned"]),
    (["distill", "method.kd_weight=0", "method.ce_weight=0"], ["is 0", "nothing would be learned"]),
    (["evaluate", "run=FINISHED", "latency_batches=0"], ["latency_batches=0"]),
    (["evaluate", "run=FINISHED", "latency_batch_size=0"], ["latency_batch_size=0"]),
    (["compress", "run=FINISHED", "latency_batch_sizes=[]"], ["latency_batch_sizes is empty"]),
    (["compress", "run=FINISHED", "latency_batch_sizes=[-4]"], ["latency_batch_sizes=-4"]),
    (["compress", "run=FINISHED", "compression.prune_structured.ignored_layers=[nope]"], ["nope"]),
    (["export", "run=FINISHED", "tolerance=inf"], ["tolerance=inf"]),
    (
        [
            "distill",
            "dataset=synthetic",
            "dataset.num_classes=10",
            "dataset.channels=1",
            "dataset.image_size=8",
            "dataset.mean=[0.5]",
            "dataset.std=[0.25]",
            "dataset.num_train=64",
            "dataset.num_test=32",
            "teacher.checkpoint=FINISHED",
        ],
        ["other classes", "class_0"],
    ),
]


@pytest.mark.parametrize("args, fragments", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_refused_before_any_work_and_leaves_nothing(finished, tmp_path, args, fragments):
    outputs = tmp_path / "outputs"
    args = [a.replace("FINISHED", str(finished)) for a in args]
    common = [] if args[0] == "export" else SMALL  # (export takes no trainer options)
    result = kd_here(args[0], *common, *args[1:], f"paths.outputs={outputs}", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not outputs.exists() or not any(p.is_file() for p in outputs.rglob("*")), list(outputs.rglob("*"))


# --- no silent wrong result ---------------------------------------------------------------------------


def broken_copy(finished: Path, tmp_path: Path, name: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / name
    shutil.copytree(finished, run)
    weights = load_file(str(run / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(run / "model.safetensors"))
    return run


def test_non_finite_outputs_never_end_as_complete(finished, tmp_path):
    nan_model = broken_copy(finished, tmp_path, "nan_model")
    result = kd_here("evaluate", f"run={nan_model}", *FAST, f"hydra.run.dir={tmp_path / 'evaluation'}", cwd=tmp_path)
    assert_one_line_error(result, "non-finite")
    assert summary(tmp_path / "evaluation")["status"] == "failed"
    result = kd_here(
        "distill", f"teacher.checkpoint={nan_model}", *SMALL, f"hydra.run.dir={tmp_path / 'student'}", cwd=tmp_path
    )
    assert_one_line_error(result, "non-finite")
    text = (tmp_path / "student" / "summary.json").read_text()
    assert json.loads(text)["status"] == "failed" and "NaN" not in text.replace("(NaN", "")


def test_summary_json_is_strict_json(tmp_path):
    from kd_cli.engine.files import write_json

    write_json(tmp_path / "s.json", {"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "loss": None,
        "rows": [None, 1.5],
    }


def test_a_broken_teacher_run_is_skipped_with_a_warning_not_retrained(finished, tmp_path):
    outputs = tmp_path / "outputs"
    shutil.copytree(finished, outputs / "good")
    shutil.copytree(finished, outputs / "broken")
    (outputs / "broken" / "model.json").write_text("{not json")
    shutil.copytree(finished, outputs / "truncated")  # the newest: its weights cut short
    weights = outputs / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = kd_here(
        "distill",
        "trainer.epochs=1",
        *SMALL,
        f"paths.outputs={outputs}",
        f"hydra.run.dir={tmp_path / 'student'}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("kd: warning:")]
    assert len(warnings) == 2 and str(outputs / "broken") in warnings[0], warnings
    assert str(outputs / "truncated") in warnings[1] and "corrupt" in warnings[1]
    assert summary(tmp_path / "student")["teacher_run"] == str(outputs / "good")
    assert not (outputs / "train-teacher").exists()


def test_a_resumed_distill_refuses_a_teacher_whose_weights_changed(finished, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(finished, teacher)
    run = tmp_path / "student"
    assert (
        kd_here(
            "distill", f"teacher.checkpoint={teacher}", "trainer.epochs=1", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path
        ).code
        == 0
    )
    assert summary(run)["teacher_weights_sha256"]
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    shutil.copyfile(broken_copy(finished, tmp_path, "other") / "model.safetensors", teacher / "model.safetensors")
    before = snapshot(run)
    assert_one_line_error(kd_here("distill", f"resume={run}", cwd=tmp_path), "holds other weights now")
    assert snapshot(run) == before


# --- bad files name themselves -------------------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_posing_as_a_checkpoint_is_refused_in_one_line_and_never_run(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    marker = tmp_path / "executed"
    (run / "checkpoints" / "last.pt").write_bytes(pickle.dumps({"epoch": Payload(marker)}))
    result = kd_here("train-teacher", f"resume={run}", cwd=tmp_path)  # were it unpickled, the marker would appear
    assert_one_line_error(result, "corrupt or not a kd checkpoint")
    assert not marker.exists()


def test_ctrl_c_while_a_stage_is_imported_leaves_no_folder(tmp_path, monkeypatch):
    """Importing a stage (torch) takes seconds after Hydra made the run's folder: an interrupt then leaves
    nothing behind (it left an empty folder that `resume=` then called no run)."""
    import kd_cli.stages

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd_cli.stages, "import_module", interrupted)
    run = tmp_path / "run"
    result = kd_here("train-teacher", *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.code == 130 and "no run was left unfinished" in result.stderr
    assert not run.exists()


def test_a_folder_with_another_tools_run_files_is_not_offered_a_resume(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    line = assert_one_line_error(
        kd_here("train-teacher", *SMALL, f"hydra.run.dir={folder}", cwd=tmp_path), "files kd did not write"
    )
    assert "resume" not in line
