"""Experiment trackers through the real CLI (`logger=`): TensorBoard, MLflow (SQLite store) and W&B
(offline) each read back by their own reader — config, every metrics.csv column per epoch, the model
— several at once with a list, a missing extra as a one-line error before any work, rank 0 alone
under DDP, and a resumed run continuing its tracked run."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kdrun import FAST, assert_one_line_error, kd, kd_ok, summary

TINY = [*FAST, "trainer.epochs=2"]
NOT_METRICS = {"epoch"}


def metrics_rows(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def columns(run: Path) -> set[str]:
    return set(metrics_rows(run)[0]) - NOT_METRICS


def mlflow_client(outputs: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")


def mlflow_run(outputs: Path, run_dir: Path):
    client = mlflow_client(outputs)
    experiment = client.get_experiment_by_name("kd")
    found = client.search_runs([experiment.experiment_id], f"tags.`kd.run_dir` = '{run_dir.resolve()}'")
    assert len(found) == 1, [r.data.tags for r in found]
    return client, found[0]


def test_one_run_tracked_by_all_three_reads_back_in_each_ones_reader(tmp_path):
    """A distilled student (kd: two loss terms) with `logger=[tensorboard,mlflow,wandb]` (its teacher is
    trained first). One test, not four: under pytest-xdist a shared module fixture would run once per worker."""
    outputs, student = tmp_path, tmp_path / "student"
    kd_ok(
        "distill",
        "logger=[tensorboard,mlflow,wandb]",
        *TINY,
        f"paths.outputs={outputs}",
        f"hydra.run.dir={student}",
        cwd=outputs,
    )
    check_a_list_fills_one_key_each(student)
    check_tensorboard(student)
    check_mlflow(outputs, student)
    check_wandb(student)


def check_tensorboard(student: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(student / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = metrics_rows(student)
    assert {"train_kd", "train_ce", "test_top1"} <= columns(student) <= set(events.Tags()["scalars"])
    for name in columns(student):
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [1, 2], name
        assert [e.value for e in logged] == pytest.approx([row[name] for row in rows], rel=1e-6), name
    assert events.Scalars("best_top1")[-1].value == pytest.approx(summary(student)["best_top1"], rel=1e-6)
    plugin = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["method.name"].string_value == "kd" and hparams["method.temperature"].number_value == 4
    assert hparams["trainer.epochs"].number_value == 2
    assert hparams["dataset.name"].string_value == "digits"
    end = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS
    model_text = events.Tensors("model/text_summary")[0].tensor_proto.string_val[0].decode()
    assert str((student / "model.safetensors").resolve()) in model_text and '"arch": "mlp"' in model_text


def check_mlflow(outputs: Path, student: Path) -> None:
    client, run = mlflow_run(outputs, student)
    assert run.info.status == "FINISHED" and run.info.run_name == "student"
    params = run.data.params
    assert params["stage"] == "distill" and params["trainer.epochs"] == "2" and params["dataset.name"] == "digits"
    assert params["method.name"] == "kd" and params["method.temperature"] == "4.0"
    rows = metrics_rows(student)
    assert {"train_kd", "train_ce", "test_top1"} <= columns(student)
    for name in columns(student):
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], name
        assert [m.value for m in history] == pytest.approx([row[name] for row in rows]), name
    assert run.data.metrics["best_top1"] == pytest.approx(summary(student)["best_top1"])
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} == {
        "model/model.safetensors",
        "model/model.json",
    }
    local = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(outputs)))
    assert local.read_bytes() == (student / "model.safetensors").read_bytes()
    assert (outputs / "mlflow-artifacts").is_dir()  # artifacts under paths.outputs, not ./mlruns
    assert not (outputs / "mlruns").exists()


def check_wandb(student: Path) -> None:
    (offline,) = (student / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(offline)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_type: dict[str, list] = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record[record["type"]])
    (run,) = by_type["run"]
    assert run["project"] == "kd" and run["display_name"] == "student"
    config = run["config"]["update"]
    assert config["trainer"]["epochs"] == 2 and config["method"]["name"] == "kd"
    assert json.loads((student / "trackers.json").read_text())["wandb"]["id"] == run["run_id"]
    history = [h["item"] for h in by_type["history"]]
    rows = metrics_rows(student)
    assert [h["epoch"] for h in history] == [1, 2]
    for name in columns(student):
        assert [h[name] for h in history] == pytest.approx([row[name] for row in rows]), name
    (artifact,) = by_type["artifact"]
    files = {entry["path"]: entry for entry in artifact["manifest"]["contents"]}
    assert artifact["type"] == "model" and set(files) == {"model.safetensors", "model.json"}
    assert files["model.safetensors"]["local_path"] == str(student / "model.safetensors")
    assert int(files["model.safetensors"]["size"]) == (student / "model.safetensors").stat().st_size
    assert by_type["exit"][0].get("exit_code", 0) == 0


def check_a_list_fills_one_key_each(student: Path) -> None:
    logger = yaml.safe_load((student / "config_resolved.yaml").read_text())["logger"]
    assert {k for k, v in logger.items() if v is not None} == {"tensorboard", "mlflow", "wandb"}
    state = json.loads((student / "trackers.json").read_text())
    assert set(state) == {"tensorboard", "mlflow", "wandb"} and all(s["epoch"] == 2 for s in state.values())


# Makes `import NAME` fail for the names in KD_TEST_BLOCK, as if the extra were not installed.
BLOCKER = """
import os, sys
BLOCKED = set(filter(None, os.environ.get("KD_TEST_BLOCK", "").split(",")))
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
"""


@pytest.mark.parametrize(
    "stage, logger, blocked",
    [
        ("train-teacher", "logger=mlflow", "mlflow"),
        ("distill", "logger=[tensorboard,wandb]", "wandb"),  # the second of a list; before any teacher is trained
    ],
)
def test_a_missing_extra_is_one_line_with_the_install_command(tmp_path, stage, logger, blocked):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER)
    outputs, run = tmp_path / "outputs", tmp_path / "outputs" / "run"
    result = kd(
        stage,
        logger,
        *TINY,
        f"paths.outputs={outputs}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"PYTHONPATH": str(shim), "KD_TEST_BLOCK": blocked},
    )
    assert_one_line_error(result, f"logger={blocked} needs the {blocked} package: pip install 'kd-cli[{blocked}]'")
    # refused before any work: no run directory left, and distill did not train a teacher first
    assert not run.exists() and (not outputs.exists() or list(outputs.iterdir()) == [])


@pytest.mark.slow  # two kd processes each (~12 s of CPU)
def test_only_rank_0_tracks_under_ddp(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "ddp"
    done = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kd_cli",
            "train-teacher",
            "logger=mlflow",
            *TINY,
            f"paths.outputs={tmp_path}",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["kd.run_dir"] == str(run.resolve())
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2


@pytest.mark.slow  # two kd processes each (~12 s of CPU)
def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    args = ["train-teacher", "logger=mlflow", "trainer.epochs=12", *FAST, f"paths.outputs={tmp_path}"]
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "kd_cli", *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (run / "checkpoints/last.pt").exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130 and summary(run)["status"] == "interrupted"
    client, first = mlflow_run(tmp_path, run)
    assert first.info.status == "KILLED"
    kd_ok("train-teacher", f"resume={run}", cwd=tmp_path)
    client, resumed = mlflow_run(tmp_path, run)
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "test_top1"))
    assert steps == list(range(1, 13))  # every epoch once: none lost at the interruption, none twice
    assert summary(run)["resumed_from_epoch"] >= 1


def test_open_trackers_off_rank_0_and_without_trackers_does_nothing(tmp_path):
    from omegaconf import OmegaConf

    from kd_cli.engine.rundir import RunDir
    from kd_cli.engine.trackers import open_trackers, selected

    cfg = OmegaConf.create(
        {
            "stage": "train-teacher",
            "paths": {"outputs": str(tmp_path)},
            "logger": {"csv": None, "tensorboard": {"dir": "tb"}, "mlflow": None, "wandb": None},
        }
    )
    assert selected(cfg.logger) == ["tensorboard"]
    run = RunDir(tmp_path / "run")
    with open_trackers(cfg, run, is_main=False) as trackers:
        trackers.log_epoch({"epoch": 1, "train_loss": 1.0})
    assert trackers.backends == [] and list(run.path.iterdir()) == []
    cfg.logger = {"csv": {}}
    assert open_trackers(cfg, run).backends == [] and list(run.path.iterdir()) == []
