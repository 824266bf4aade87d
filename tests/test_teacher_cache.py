"""The teacher cache: later runs of a data stream read the teacher's logits the first run stored, and
train exactly as if they had run the teacher; what cannot be trusted is recomputed or refused."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from kdrun import FAST, assert_one_line_error, kd, kd_here, summary
from safetensors.torch import save_file

from kd_cli.engine.teacher_cache import FileLock, TeacherCache, entries, evict

EPOCHS = ["trainer.epochs=2", "trainer.max_steps_per_epoch=6"]
TIMING = {"images_per_s", "seconds"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    run = folder / "teacher"
    result = kd_here("train-teacher", *FAST, "trainer.epochs=2", f"hydra.run.dir={run}", cwd=folder)
    assert result.code == 0, result.stderr
    return run


def distill(teacher: Path, folder: Path, name: str, *overrides: str) -> Path:
    run = folder / name
    result = kd_here(
        "distill",
        *FAST,
        *EPOCHS,
        f"teacher.checkpoint={teacher}",
        f"paths.outputs={folder}",
        f"hydra.run.dir={run}",
        *overrides,
        cwd=folder,
    )
    assert result.code == 0, result.stderr
    return run


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def served(run: Path) -> tuple[int, int]:
    cache = summary(run)["teacher_cache"]
    return cache["epochs_read"], cache["epochs_computed"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_reading_the_cache_trains_exactly_as_one_running_the_teacher(teacher, tmp_path, precision):
    setting = f"trainer.precision={precision}"
    filled = distill(teacher, tmp_path, "filled", setting)
    read = distill(teacher, tmp_path, "read", setting)
    plain = distill(teacher, tmp_path, "plain", setting, "teacher_cache.enabled=false")
    assert served(filled) == (0, 2) and served(read) == (2, 0)
    assert summary(plain)["teacher_cache"] is None
    assert metrics(read) == metrics(plain) == metrics(filled)  # the same bits, epoch by epoch
    assert summary(read)["best_top1"] == summary(plain)["best_top1"]


def test_runs_that_differ_in_what_the_teacher_sees_do_not_share(teacher, tmp_path):
    distill(teacher, tmp_path, "first")
    assert served(distill(teacher, tmp_path, "temperature", "method.temperature=2")) == (2, 0)  # same stream
    assert served(distill(teacher, tmp_path, "seed", "seed=1")) == (0, 2)  # seed draws the stream too
    assert served(distill(teacher, tmp_path, "batch", "trainer.batch_size=32")) == (0, 2)
    assert served(distill(teacher, tmp_path, "augmentation", "augmentation=none")) == (0, 2)
    assert len(entries(tmp_path / ".cache" / "teacher")) == 4


def test_a_fixed_aug_seed_shares_the_teachers_outputs_across_seeds(teacher, tmp_path):
    one = distill(teacher, tmp_path, "one", "seed=1", "dataset.aug_seed=7")
    two = distill(teacher, tmp_path, "two", "seed=2", "dataset.aug_seed=7")
    assert served(one) == (0, 2) and served(two) == (2, 0)
    assert metrics(one) != metrics(two)  # the students differ (their initialisation), the stream does not


def test_feature_methods_on_maps_run_their_teacher(teacher, tmp_path):
    run = distill(teacher, tmp_path, "fitnet", "method=fitnet", "student=cnn", "student.kwargs.width=8")
    assert summary(run)["teacher_cache"] is None and not (tmp_path / ".cache").exists()


@pytest.mark.parametrize("method", ["pkt", "crd"])
def test_a_feature_method_on_embeddings_reads_them_from_the_cache_exactly(teacher, tmp_path, method):
    """PKT and CRD read the teacher's pooled embedding: it is stored beside the logits (another entry than
    the logits alone), and a run reading both trains to the same bits as one running the teacher."""
    setting = [
        "trainer.precision=fp32",
        f"method={method}",
        "student=cnn",
        "student.kwargs.width=8",
        "method.kd_weight=0.5",
    ]
    filled = distill(teacher, tmp_path, "filled", *setting)
    read = distill(teacher, tmp_path, "read", *setting)
    plain = distill(teacher, tmp_path, "plain", *setting, "teacher_cache.enabled=false")
    assert served(filled) == (0, 2) and served(read) == (2, 0)
    assert summary(read)["teacher_cache"]["outputs"] == ["logits", "feature:pool"]
    assert metrics(read) == metrics(plain) == metrics(filled)
    logits_only = distill(teacher, tmp_path, "kd", "trainer.precision=fp32", "student=cnn", "student.kwargs.width=8")
    assert served(logits_only) == (0, 2)  # the logits alone are another entry
    assert len(entries(tmp_path / ".cache" / "teacher")) == 2


def test_outputs_for_other_images_are_refused_in_one_line(teacher, tmp_path):
    run = distill(teacher, tmp_path, "first")
    entry = tmp_path / ".cache" / "teacher" / summary(run)["teacher_cache"]["key"]
    stored = entry / "epoch-00000.safetensors"
    tensors, metadata = read_entry_file(stored)
    save_file({"logits": tensors["logits"], "checksums": tensors["checksums"] + 1.0}, str(stored), metadata=metadata)
    result = kd_here(
        "distill",
        *FAST,
        *EPOCHS,
        f"teacher.checkpoint={teacher}",
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'second'}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "holds outputs for other images", "kd cache clear")
    assert summary(tmp_path / "second")["status"] == "failed"


def read_entry_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as stored:
        return {name: stored.get_tensor(name) for name in stored.keys()}, stored.metadata()


def tampered(tensors: dict, how: str) -> dict:
    logits = tensors["logits"].clone()
    if how == "one value":
        logits[0, 0, 0] += 100.0  # bit rot that leaves a plausible file
    elif how == "nan":
        logits[1, 2, 3] = float("nan")
    elif how == "shape":
        logits = logits[..., :7].contiguous()
    return {"logits": logits, "checksums": tensors["checksums"]}


@pytest.mark.parametrize("how", ["one value", "nan", "shape"])
def test_a_tampered_cache_file_is_recomputed_with_a_warning(teacher, tmp_path, how):
    run = distill(teacher, tmp_path, "first")
    entry = tmp_path / ".cache" / "teacher" / summary(run)["teacher_cache"]["key"]
    stored = entry / "epoch-00000.safetensors"
    tensors, metadata = read_entry_file(stored)
    save_file(tampered(tensors, how), str(stored), metadata=metadata)
    result = kd_here(
        "distill",
        *FAST,
        *EPOCHS,
        f"teacher.checkpoint={teacher}",
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'again'}",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    assert "kd: warning: teacher cache:" in result.stderr and "damaged" in result.stderr
    assert served(tmp_path / "again") == (1, 1) and metrics(tmp_path / "again") == metrics(run)


def test_an_entry_without_its_key_file_is_listed_cleared_and_repaired(teacher, tmp_path):
    run = distill(teacher, tmp_path, "first")
    cache = tmp_path / ".cache" / "teacher"
    key_file = cache / summary(run)["teacher_cache"]["key"] / "key.json"
    key_file.unlink()
    assert served(distill(teacher, tmp_path, "again")) == (2, 0)
    assert json.loads(key_file.read_text())["teacher_arch"] == "cnn"  # written again, whole
    key_file.write_text("{broken")
    listed = kd_here("cache", "ls", f"dir={cache}", cwd=tmp_path)
    assert listed.code == 0 and "1 entry" in listed.stdout
    assert kd_here("cache", "clear", f"dir={cache}", cwd=tmp_path).code == 0 and entries(cache) == []


def test_a_broken_cache_file_is_recomputed(teacher, tmp_path):
    run = distill(teacher, tmp_path, "first")
    entry = tmp_path / ".cache" / "teacher" / summary(run)["teacher_cache"]["key"]
    (entry / "epoch-00001.safetensors").write_bytes(b"not a safetensors file")
    again = distill(teacher, tmp_path, "again")
    assert served(again) == (1, 1)
    assert metrics(again) == metrics(run)
    assert served(distill(teacher, tmp_path, "third")) == (2, 0)  # rewritten whole


def test_an_unwritable_cache_costs_speed_not_the_run(teacher, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = kd_here(
        "distill",
        *FAST,
        *EPOCHS,
        f"teacher.checkpoint={teacher}",
        f"paths.outputs={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"teacher_cache.dir={blocker}/cache",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    assert "teacher cache" in result.stderr and "cannot be written" in result.stderr
    assert served(tmp_path / "run") == (0, 2)


def test_an_epoch_another_run_is_filling_is_computed_and_not_stored(tmp_path):
    teacher = torch.nn.Linear(4, 3)
    cache = TeacherCache(tmp_path, {"teacher": "t"}, max_bytes=2**30)
    cache.start(steps=2)
    cache.entry.mkdir(parents=True)
    other = FileLock(cache.entry / ".epoch-00000.lock")
    assert other.try_acquire()  # (flock: held per open file, so this process's second open contends too)
    batches = [torch.randn(5, 4) for _ in range(2)]
    with cache.epoch(0, torch.device("cpu")):
        outputs = [cache.logits(batch, teacher) for batch in batches]
    assert not (cache.entry / "epoch-00000.safetensors").exists()
    other.release()
    with cache.epoch(0, torch.device("cpu")):
        assert torch.equal(cache.logits(batches[0], teacher), outputs[0])
        cache.logits(batches[1], teacher)
    assert (cache.entry / "epoch-00000.safetensors").exists()
    assert not list(cache.entry.glob(".epoch-*.lock"))


def test_an_epoch_cut_short_stores_nothing(tmp_path):
    teacher = torch.nn.Linear(4, 3)
    cache = TeacherCache(tmp_path, {"teacher": "t"}, max_bytes=2**30)
    cache.start(steps=3)
    with pytest.raises(KeyboardInterrupt), cache.epoch(0, torch.device("cpu")):
        cache.logits(torch.randn(5, 4), teacher)
        raise KeyboardInterrupt
    assert not list(cache.entry.glob("epoch-*")) and not list(cache.entry.glob(".epoch-*.lock"))


def test_eviction_removes_the_least_recently_used_entries(tmp_path):
    for age, key in enumerate(["old", "mid", "new"]):
        entry = tmp_path / key
        entry.mkdir()
        (entry / "epoch-00000.safetensors").write_bytes(b"x" * 1000)
        (entry / "key.json").write_text(json.dumps({"teacher_arch": key}))
        os.utime(entry / "key.json", (1000 + age, 1000 + age))
    removed = evict(tmp_path, max_bytes=2000, keep="old")
    assert [p.name for p in removed] == ["mid"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


def test_kd_cache_lists_and_clears(teacher, tmp_path):
    distill(teacher, tmp_path, "first")
    cache = tmp_path / ".cache" / "teacher"
    listed = kd("cache", "ls", f"dir={cache}", cwd=tmp_path)
    assert listed.code == 0 and "cnn" in listed.stdout and "digits" in listed.stdout and "1 entry" in listed.stdout
    key = entries(cache)[0].path.name
    assert_one_line_error(kd_here("cache", "clear", f"dir={cache}", "key=zzz", cwd=tmp_path), "no entry", "zzz")
    assert_one_line_error(kd_here("cache", "purge", cwd=tmp_path), "unknown action 'purge'", "ls, clear")
    assert_one_line_error(kd_here("cache", "ls", "folder=x", cwd=tmp_path), "unknown option 'folder=x'")
    assert_one_line_error(kd_here("cache", "ls", f"dir={cache}", "key=zzz", cwd=tmp_path), "no entry", "zzz")
    assert_one_line_error(kd_here("cache", "ls", "dir=", cwd=tmp_path), "dir= is empty")
    assert_one_line_error(kd_here("cache", "ls", f"dir={cache / key / 'key.json'}", cwd=tmp_path), "is a file")
    assert "no such folder yet" in kd_here("cache", "ls", f"dir={tmp_path / 'none'}", cwd=tmp_path).stdout
    assert key[:8] in kd_here("cache", "ls", f"dir={cache}", f"key={key[:8]}", cwd=tmp_path).stdout
    cleared = kd_here("cache", "clear", f"dir={cache}", f"key={key[:6]}", cwd=tmp_path)
    assert cleared.code == 0 and "removed 1 entry" in cleared.stdout
    assert entries(cache) == []


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("teacher_cache.max_gb=0", "must be in (0,"),
        ("teacher_cache.max_gb=abc", "teacher_cache.max_gb"),
        ("dataset.aug_seed=-1", "aug_seed"),
        ("+teacher_cache.size=3", "size"),
    ],
)
def test_bad_cache_settings_are_one_line_errors(tmp_path, override, fragment):
    assert_one_line_error(kd_here("distill", override, cwd=tmp_path), fragment)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_folder_stream_is_cached_exactly(tmp_path, workers):
    """PNG files in class folders, random resized crops and flips drawn in DataLoader workers: the crops
    depend on (seed, epoch, batch), so a later run reads the teacher's logits and trains the same."""
    from formats import digits_images, save_image

    images, labels = digits_images(240)
    for i, (image, label) in enumerate(zip(images, labels)):
        save_image(tmp_path / "digits" / str(label) / f"{i}.png", image)
    data = [
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'digits'}",
        "dataset.image_size=16",
        "dataset.val_fraction=0",
        "teacher=cnn",
        f"trainer.num_workers={workers}",
        "trainer.progress=plain",
        *EPOCHS,
        "trainer.batch_size=32",
    ]
    student = ["student=cnn", "student.kwargs.width=4"]
    teacher = tmp_path / "teacher"
    assert kd_here("train-teacher", *data, f"hydra.run.dir={teacher}", cwd=tmp_path).code == 0
    runs = []
    for name, enabled in (("filled", "true"), ("read", "true"), ("plain", "false")):
        run = tmp_path / name
        result = kd_here(
            "distill",
            *data,
            *student,
            f"teacher.checkpoint={teacher}",
            f"paths.outputs={tmp_path}",
            f"teacher_cache.enabled={enabled}",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
        )
        assert result.code == 0, result.stderr
        runs.append(run)
    filled, read, plain = runs
    assert served(filled) == (0, 2) and served(read) == (2, 0)
    assert metrics(read) == metrics(plain) == metrics(filled)
