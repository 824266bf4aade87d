"""Hydra launcher and sweeper plugins through the real CLI on digits: joblib's parallel jobs give the
basic launcher's numbers job for job, submitit's local executor runs a sweep, the SLURM preset
composes with its keys, and the Optuna preset runs trials that maximise the best test top-1."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from kdrun import FAST, kd_here_ok, kd_ok, summary

TINY = [*FAST, "trainer.epochs=2"]
TIMING = {"seconds", "images_per_s"}  # the only columns allowed to differ between identical runs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launchers")


@pytest.fixture(scope="module")
def teacher(outputs) -> Path:
    run = outputs / "teacher"
    kd_here_ok("train-teacher", *TINY, f"paths.outputs={outputs}", f"hydra.run.dir={run}", cwd=outputs)
    return run


def sweep(outputs: Path, teacher: Path, name: str, *args: str) -> Path:
    """Run `kd distill -m ...` into outputs/<name>; return its sweep folder."""
    root = outputs / name
    kd_here_ok("distill", "-m", *args, f"teacher.checkpoint={teacher}", *TINY, f"paths.outputs={root}", cwd=outputs)
    (folder,) = (root / "multirun").glob("*/*")
    return folder


def jobs(folder: Path) -> dict[tuple[tuple[str, str], ...], Path]:
    """The job directories of a sweep by their swept overrides (launcher-independent)."""
    found = {}
    for overrides in folder.glob("*/.hydra/overrides.yaml"):
        swept = tuple(
            sorted(
                tuple(o.split("=", 1))
                for o in yaml.safe_load(overrides.read_text())
                if o.split("=", 1)[0] in ("method.temperature", "seed")
            )
        )
        found[swept] = overrides.parent.parent
    return found


def results(run: Path) -> tuple[list[dict], dict]:
    with open(run / "metrics.csv") as handle:
        rows = [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]
    done = summary(run)
    return rows, {k: done[k] for k in ("status", "best_top1", "last_top1", "last_train_loss", "epochs")}


@pytest.fixture(scope="module")
def basic(outputs, teacher) -> dict:
    return jobs(sweep(outputs, teacher, "basic", "method.temperature=2,4", "seed=0,1"))


def test_joblib_runs_the_jobs_in_parallel_with_the_basic_launchers_results(outputs, teacher, basic):
    parallel = sweep(
        outputs,
        teacher,
        "joblib",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method.temperature=2,4",
        "seed=0,1",
    )
    assert "joblib" in (parallel / "multirun.yaml").read_text()
    by_job = jobs(parallel)
    assert sorted(by_job) == sorted(basic) and len(basic) == 4
    for key, run in by_job.items():
        rows, final = results(run)
        assert final["status"] == "complete" and len(rows) == 2
        assert (rows, final) == results(basic[key]), key


@pytest.mark.slow  # each job is a fresh Python process started by submitit (~15 s of CPU in all)
def test_submitit_local_executor_runs_a_sweep(outputs, teacher, basic):
    folder = sweep(outputs, teacher, "submitit", "hydra/launcher=submitit_local", "method.temperature=2,4", "seed=0")
    assert list((folder / ".submitit").iterdir())  # submitit's own job folders (pickled job, logs)
    by_job = jobs(folder)
    assert len(by_job) == 2
    for key, run in by_job.items():
        assert results(run) == results(basic[key]), key  # same numbers in submitit's own processes


def test_slurm_preset_composes_the_submitit_slurm_launcher(tmp_path):
    shown = kd_ok(
        "distill", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path
    ).stdout
    launcher = yaml.safe_load(shown)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu"
    assert {
        k: launcher[k]
        for k in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism")
    } == {
        "gpus_per_node": 1,
        "tasks_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 32,
        "timeout_min": 720,
        "array_parallelism": 64,
    }
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


def test_optuna_preset_maximises_best_top1(outputs, teacher):
    root = outputs / "optuna"
    kd_here_ok(
        "distill",
        "hparams_search=kd_optuna",
        "hydra.sweeper.n_trials=3",
        f"teacher.checkpoint={teacher}",
        *TINY,
        f"paths.outputs={root}",
        cwd=outputs,
    )  # no -m: the preset sets hydra.mode=MULTIRUN
    (folder,) = (root / "multirun").glob("*/*")
    trials = sorted(folder.glob("*/summary.json"))
    assert len(trials) == 3
    tried = []
    for path in trials:
        method = yaml.safe_load((path.parent / "config_resolved.yaml").read_text())["method"]
        assert summary(path.parent)["status"] == "complete"
        assert 1.0 <= method["temperature"] <= 8.0 and 0.1 <= method["kd_weight"] <= 1.0
        tried.append((summary(path.parent)["best_top1"], method["temperature"], method["kd_weight"]))
    assert len({(t, w) for _, t, w in tried}) == 3  # three different proposals
    found = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    best = max(value for value, _, _ in tried)
    assert found["best_value"] == pytest.approx(best)
    chosen = (found["best_params"]["method.temperature"], found["best_params"]["method.kd_weight"])
    assert chosen in [(t, w) for value, t, w in tried if value == best]


def test_a_method_search_preset_samples_its_log_scale_space(outputs):
    """hparams_search=tfkd_optuna: the method picked by the preset, its weight drawn on a log scale."""
    root = outputs / "optuna-tfkd"
    kd_here_ok(
        "distill", "hparams_search=tfkd_optuna", "hydra.sweeper.n_trials=2", *TINY, f"paths.outputs={root}", cwd=outputs
    )
    (folder,) = (root / "multirun").glob("*/*")
    trials = [
        yaml.safe_load((p.parent / "config_resolved.yaml").read_text())["method"]
        for p in sorted(folder.glob("*/summary.json"))
    ]
    assert len(trials) == 2 and all(t["name"] == "tfkd" and 1.0 <= t["tfkd_weight"] <= 100.0 for t in trials)
    assert (folder / "optimization_results.yaml").exists()


def test_a_failed_joblib_job_makes_the_sweep_exit_non_zero(outputs, teacher):
    from kdrun import assert_one_line_error, kd, kd_here

    root = outputs / "joblib-failing"
    # A bad value is refused before any job runs, whatever the launcher...
    refused = kd_here(
        "distill",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method.temperature=2,-1",
        f"teacher.checkpoint={teacher}",
        *TINY,
        f"paths.outputs={root}",
        cwd=outputs,
    )
    assert_one_line_error(refused, "job 1 of the sweep", "method.temperature=-1", "no job was run")
    assert not list(root.glob("multirun/*/*/*/summary.json"))
    # ...and a job that fails as it trains (a learning rate that diverges) fails the sweep's exit status
    result = kd(
        "distill",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optim.lr=0.05,1e9",
        f"teacher.checkpoint={teacher}",
        *TINY,
        f"paths.outputs={root}",
        cwd=outputs,
    )
    assert_one_line_error(result, "job(s) of the sweep did not complete", "became nan")
    statuses = sorted(summary(p.parent)["status"] for p in root.glob("multirun/*/*/*/summary.json"))
    assert statuses == ["complete", "failed"]  # the other job went on and finished


def test_a_missing_launcher_plugin_is_one_line_with_the_install_command(tmp_path):
    """Without hydra-submitit-launcher, Hydra finds no `hydra/launcher/submitit_*` option; an option of
    that family that does not exist gives the same Hydra error here, through the real CLI."""
    from kdrun import assert_one_line_error, kd_here

    result = kd_here(
        "distill", "-m", "hydra/launcher=submitit_pbs", "seed=0,1", *TINY, f"paths.outputs={tmp_path}", cwd=tmp_path
    )
    assert_one_line_error(result, "hydra/launcher/submitit_pbs", "pip install 'kd-cli[slurm]'")
