"""End to end through the real CLI on real data (scikit-learn's digits, MNIST, CIFAR-100's format):
train-teacher -> distill -> evaluate, the run directory contract, resume, determinism, bad files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from formats import MNIST_T10K, load_mnist_t10k, write_mnist_raw, write_pickle
from kdrun import FAST, assert_one_line_error, kd_here, kd_here_ok, kd_ok, run_dirs, summary

TIMING = {"seconds", "images_per_s"}  # the only columns allowed to differ between identical runs


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def teacher_run(outputs) -> Path:
    run = outputs / "teacher"
    kd_ok("train-teacher", "trainer.epochs=3", *FAST, f"paths.outputs={outputs}", f"hydra.run.dir={run}", cwd=outputs)
    return run


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def test_train_teacher_writes_the_whole_run_directory(teacher_run):
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/hydra.yaml",
        "config_resolved.yaml",
        "env.json",
        "metrics.csv",
        "summary.json",
        "model.safetensors",
        "model.json",
        "checkpoints/last.pt",
        "train-teacher.log",
    ):
        assert (teacher_run / name).is_file(), name
    done = summary(teacher_run)
    assert done["status"] == "complete" and done["epochs"] == 3 and done["role"] == "teacher"
    assert 50 < done["last_top1"] <= 100 and done["params"] > 0
    env = json.loads((teacher_run / "env.json").read_text())
    assert {"torch", "torchvision", "kd", "git_sha", "device", "seed", "data_fingerprint"} <= env.keys()
    rows = list(csv.DictReader(open(teacher_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_ce", "lr", "train_top1", "test_top1", "images_per_s", "seconds"} <= rows[0].keys()
    state = torch.load(teacher_run / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 3
    spec = json.loads((teacher_run / "model.json").read_text())
    assert (spec["arch"], spec["num_classes"], spec["in_channels"], spec["input_size"]) == ("cnn", 10, 1, 8)
    assert "epoch 3/3" in (teacher_run / "train-teacher.log").read_text()


def test_distill_then_evaluate_agree(teacher_run, outputs):
    student = outputs / "student"
    out = kd_here_ok(
        "distill",
        f"teacher.checkpoint={teacher_run}",
        "trainer.epochs=2",
        *FAST,
        f"paths.outputs={outputs}",
        f"hydra.run.dir={student}",
        cwd=outputs,
    ).stdout
    done = summary(student)
    assert done["status"] == "complete" and done["method"] == "kd"
    assert done["teacher_top1"] == pytest.approx(summary(teacher_run)["last_top1"])
    assert "train_kd" in metrics(student)[0] and "train_ce" in metrics(student)[0]
    assert "teacher cnn test top-1" in out and "student mlp test top-1" in out
    evaluation = outputs / "evaluation"
    kd_here_ok(  # in this process: the distill above is the real one
        "evaluate",
        f"run={student}",
        f"teacher_run={teacher_run}",
        "latency_batches=3",
        *FAST,
        f"paths.outputs={outputs}",
        f"hydra.run.dir={evaluation}",
        cwd=outputs,
    )
    scores = summary(evaluation)
    assert scores["top1"] == pytest.approx(done["last_top1"], abs=1e-9)
    assert scores["top5"] >= scores["top1"] and scores["nll"] > 0 and 0 <= scores["ece"] <= 100
    assert scores["macs"] > 0 and isinstance(scores["latency_ms"], float) and scores["params"] == done["params"]
    assert scores["size_bytes"] == (student / "model.safetensors").stat().st_size
    assert 0 <= scores["teacher_agreement"] <= 100 and len(scores["per_class_accuracy"]) == 10
    assert (evaluation / "confusion.png").stat().st_size > 1000 and (evaluation / "per_class.csv").exists()


def test_distill_auto_finds_the_matching_teacher(teacher_run, outputs):
    # teacher=cnn spells out the options that teacher=default (the one trained) left implicit
    run = outputs / "auto"
    kd_here_ok(
        "distill",
        "teacher=cnn",
        "trainer.epochs=1",
        *FAST,
        f"paths.outputs={outputs}",
        f"hydra.run.dir={run}",
        cwd=outputs,
    )
    assert Path(summary(run)["teacher_run"]) == teacher_run
    assert json.loads((teacher_run / "model.json").read_text())["kwargs"] == {"width": 32, "depth": 2, "dropout": 0.0}


def test_distill_trains_a_teacher_first_when_none_exists(tmp_path):
    result = kd_ok("distill", "trainer.epochs=1", *FAST, f"paths.outputs={tmp_path}", cwd=tmp_path)
    teachers = list((tmp_path / "train-teacher").glob("*/*/summary.json"))
    assert len(teachers) == 1 and "training one first" in result.stdout
    assert Path(summary(run_dirs(tmp_path, "distill")[0])["teacher_run"]) == teachers[0].parent


def test_same_seed_gives_identical_metrics_and_weights(tmp_path):
    runs = [tmp_path / name for name in ("a", "b")]
    for run, kd_run in zip(runs, (kd_here_ok, kd_ok), strict=True):  # one in this process, one in its own
        kd_run("train-teacher", "trainer.epochs=2", "seed=3", *FAST, f"hydra.run.dir={run}", cwd=tmp_path)
    assert metrics(runs[0]) == metrics(runs[1])
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()


def start_kd(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kd_cli", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["train-teacher", "trainer.epochs=12", "seed=5", *FAST]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert kd_here(*args, f"hydra.run.dir={whole}", cwd=tmp_path).code == 0
    process = start_kd(*args, f"hydra.run.dir={broken}", cwd=tmp_path)
    while not (broken / "checkpoints/last.pt").exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "resume=" in stderr and "Traceback" not in stderr
    assert summary(broken)["status"] == "interrupted"
    done_before = len(metrics(broken))
    assert 1 <= done_before < 12
    kd_here_ok("train-teacher", f"resume={broken}", cwd=tmp_path)
    assert summary(broken)["status"] == "complete" and summary(broken)["resumed_from_epoch"] >= 1
    assert metrics(broken) == metrics(whole)
    assert (broken / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_directory_holding_a_run_is_never_overwritten(teacher_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in teacher_run.rglob("*") if p.is_file()}
    assert_one_line_error(kd_here("train-teacher", f"hydra.run.dir={teacher_run}", cwd=tmp_path), "resume=")
    assert_one_line_error(kd_here("train-teacher", f"resume={teacher_run}", cwd=tmp_path), "already complete")
    assert {p: p.stat().st_mtime_ns for p in teacher_run.rglob("*") if p.is_file()} == before


def test_corrupt_checkpoint_is_a_one_line_error(teacher_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    (run / "checkpoints/last.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(kd_here("train-teacher", f"resume={run}", cwd=tmp_path), "corrupt")


def test_corrupt_or_mismatched_weights_are_one_line_errors(teacher_run, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(teacher_run, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_one_line_error(kd_here("evaluate", f"run={corrupt}", cwd=tmp_path), "corrupt")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(teacher_run, mismatched)
    spec = json.loads((mismatched / "model.json").read_text())
    (mismatched / "model.json").write_text(json.dumps({**spec, "arch": "mlp", "kwargs": {}}))
    assert_one_line_error(kd_here("evaluate", f"run={mismatched}", cwd=tmp_path), "do not match")
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickled)
    assert_one_line_error(kd_here("evaluate", f"run={pickled}", cwd=tmp_path), "safetensors")


def test_teacher_for_another_data_set_is_refused(teacher_run, tmp_path):
    result = kd_here(
        "distill",
        "dataset=synthetic",
        "dataset.num_classes=3",
        "dataset.channels=1",
        "dataset.image_size=8",
        "dataset.mean=[0.5]",
        "dataset.std=[0.25]",
        "dataset.num_train=64",
        "dataset.num_test=32",
        f"teacher.checkpoint={teacher_run}",
        *FAST,
        cwd=tmp_path,
    )
    assert_one_line_error(result, "10 classes", "3 and 1")


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason="real MNIST test files not found beside the repository")
def test_mnist_real_images_through_the_cli(tmp_path):
    images, labels = load_mnist_t10k()
    write_mnist_raw(tmp_path / "data", images, labels, n_train=8000)
    run = tmp_path / "run"
    kd_here_ok(
        "train-teacher",
        "dataset=mnist",
        f"paths.data={tmp_path / 'data'}",
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=100",
        *FAST,
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    env = json.loads((run / "env.json").read_text())
    assert (env["train_samples"], env["test_samples"]) == (8000, 2000)
    assert summary(run)["last_top1"] > 70  # 100 steps of a small CNN on real digits (chance: 10)


def write_cifar100(root: Path, train: int, test: int) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train), ("test", test)):
        labels = (np.arange(count) % 100).tolist()
        write_pickle(
            folder / name,
            {
                "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                "fine_labels": labels,
                "coarse_labels": [x // 5 for x in labels],
                "filenames": [f"{i}.png" for i in range(count)],
                "batch_label": name,
            },
        )
    names = [f"class_{i}" for i in range(100)]
    write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]})


def test_cifar100_format_runs_the_readme_command(tmp_path):
    missing = kd_here(
        "distill", "dataset=cifar100", "student=resnet18", f"paths.data={tmp_path / 'data'}", cwd=tmp_path
    )
    assert_one_line_error(missing, str(tmp_path / "data"), "dataset.download")
    write_cifar100(tmp_path / "data", train=200, test=100)
    kd_ok(
        "distill",
        "dataset=cifar100",
        "student=resnet18",
        "debug=default",
        "dataset.verify_checksums=false",
        "trainer.max_steps_per_epoch=2",
        "trainer.batch_size=16",
        f"paths.data={tmp_path / 'data'}",
        f"paths.outputs={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    student = run_dirs(tmp_path / "out", "distill")[0]
    done = summary(student)
    assert done["status"] == "complete" and done["teacher_arch"] == "resnet32x4" and done["arch"] == "resnet18"
    assert json.loads((student / "model.json").read_text())["num_classes"] == 100


def test_sweep_with_the_flag_after_overrides(teacher_run, outputs):
    kd_here_ok(
        "distill", "trainer.epochs=1", "-m", "method.temperature=2,8", *FAST, f"paths.outputs={outputs}", cwd=outputs
    )
    sweep = sorted((outputs / "multirun").glob("*/*"))[-1]
    assert (sweep / "multirun.yaml").exists()
    temperatures = sorted(
        json.loads((sweep / str(i) / "summary.json").read_text())["status"] == "complete"
        and float(
            __import__("yaml").safe_load((sweep / str(i) / "config_resolved.yaml").read_text())["method"]["temperature"]
        )
        for i in (0, 1)
    )
    assert temperatures == [2.0, 8.0]


def test_torchrun_ddp_on_cpu_writes_one_run(tmp_path):
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
            "trainer.epochs=2",
            *FAST,
            f"paths.outputs={tmp_path}",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(run)["status"] == "complete"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # rank 1 wrote nothing under outputs


@pytest.mark.slow  # two torchrun launches (~25 s of CPU)
def test_torchrun_ddp_resume_continues_the_checkpoint_on_every_rank(tmp_path):
    """Rank 1 writes a scratch directory; on resume it must continue rank 0's checkpoint too, else
    the ranks run different numbers of epochs and the collectives no longer match."""
    torchrun = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kd_cli",
    ]
    run = tmp_path / "ddp"
    first = subprocess.run(
        [*torchrun, "train-teacher", "trainer.epochs=2", *FAST, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "summary.json").write_text(json.dumps({**summary(run), "status": "interrupted"}))
    longer = subprocess.run(
        [*torchrun, "train-teacher", f"resume={run}", "trainer.epochs=4", "resume_extend=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    done = summary(run)
    assert done["status"] == "complete" and done["epochs"] == 4 and done["resumed_from_epoch"] == 2
    assert [int(row["epoch"]) for row in metrics(run)] == [1, 2, 3, 4]


def test_progress_bars_and_plain_lines(tmp_path):
    bars = kd_ok(
        "train-teacher", "trainer.epochs=2", "trainer.progress=bar", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path
    ).stdout
    assert "epoch 2/2" in bars and "test top-1" in bars
    plain = kd_ok(
        "train-teacher", "trainer.epochs=2", "trainer.progress=plain", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path
    ).stdout
    assert "[teacher cnn] epoch 1/2" in plain and "[teacher cnn] epoch 2/2" in plain
    assert "epoch 2/2" in (tmp_path / "a" / "train-teacher.log").read_text()  # bars still log each epoch to file


def test_born_again_generations_each_teach_the_next(teacher_run, tmp_path):
    run = tmp_path / "ban"
    out = kd_here_ok(
        "distill",
        "method=born_again",
        "method.generations=2",
        "student=cnn",
        "student.kwargs.width=8",
        f"teacher.checkpoint={teacher_run}",
        "trainer.epochs=2",
        *FAST,
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    ).stdout
    first, final = summary(run / "generation-1"), summary(run)
    assert first["status"] == "complete" and first["generation"] == 1
    assert final["status"] == "complete" and len(final["generations_top1"]) == 2
    assert final["generations_top1"] == [first["last_top1"], final["last_top1"]]
    assert "generation 1 test top-1" in out and (run / "model.safetensors").exists()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_processes(commands: list[list[str]], envs: list[dict], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start both at once (they rendezvous), then wait for both."""
    procs = [
        subprocess.Popen(
            cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, env in zip(commands, envs)
    ]
    outcomes = []
    for proc, cmd in zip(procs, commands):
        out, err = proc.communicate(timeout=300)
        outcomes.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return outcomes


@pytest.mark.slow  # two nodes' rendezvous (~20 s of CPU)
def test_two_torchrun_nodes_train_one_run(tmp_path):
    """`torchrun --nnodes=2` over loopback (gloo): node 0 and node 1 train one run, and one run directory
    is written, by rank 0."""
    port, run = free_port(), tmp_path / "out" / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    commands = [
        [
            torchrun,
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "kd_cli",
            "train-teacher",
            "trainer.epochs=2",
            *FAST,
            f"paths.outputs={tmp_path / 'out'}",
            f"hydra.run.dir={run}",
        ]
        for node in (0, 1)
    ]
    for done in two_processes(commands, [{}, {}], tmp_path):
        assert done.returncode == 0, done.stderr[-3000:]
    assert summary(run)["status"] == "complete"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["run"]


@pytest.mark.slow
def test_the_tasks_of_a_slurm_step_train_one_run(tmp_path):
    """What `srun --ntasks=2 kd ...` (or the submitit launcher with two tasks) gives each process: SLURM's
    variables only. kd derives the ranks from them, and the two tasks train one run."""
    run = tmp_path / "out" / "run"
    command = [
        sys.executable,
        "-m",
        "kd_cli",
        "train-teacher",
        "trainer.epochs=2",
        *FAST,
        f"paths.outputs={tmp_path / 'out'}",
        f"hydra.run.dir={run}",
    ]
    slurm = {
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_JOB_ID": str(free_port()),
        "MASTER_ADDR": "127.0.0.1",
    }
    envs = [{**slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)} for task in (0, 1)]
    for done in two_processes([command, command], envs, tmp_path):
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert summary(run)["status"] == "complete"
