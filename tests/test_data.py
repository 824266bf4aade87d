"""The data layer: real data in real on-disk formats through torchvision's own classes, augmentation
statistics, and the loaders' determinism and DDP sharding.

CIFAR and SVHN files are written here in their real formats (pickled batches, MATLAB .mat). torchvision
checks them against the md5s of the official files; the tests swap in the md5s of the files they wrote
(the classes' own `train_list`/`test_list`/`meta`/`split_list` attributes), so the real classes still
verify integrity and parse the files themselves.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from formats import MNIST_T10K, load_mnist_t10k, md5, write_cifar, write_mnist_raw
from omegaconf import OmegaConf
from PIL import Image
from torchvision import datasets as tv

from kd_cli.data import (
    DATASETS,
    Augmentation,
    FolderSplit,
    TensorSplit,
    load_dataset,
    make_loader,
)
from kd_cli.data.augment import augment_batch, normalize
from kd_cli.errors import KdError

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- configs


def dataset_node(name: str) -> dict:
    yaml = OmegaConf.load(REPO / f"configs/dataset/{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"data": "data"}}, {"dataset": yaml})
    return OmegaConf.to_container(cfg.dataset, resolve=True)


DATASET_YAMLS = sorted(p.stem for p in (REPO / "configs/dataset").glob("*.yaml"))


def test_every_registered_data_set_has_a_yaml():
    assert DATASET_YAMLS == DATASETS.names()


@pytest.mark.parametrize("name", ["none", "standard", "rotate", "strong"])
def test_augmentation_yamls_build_an_augment_spec(name):
    cfg = OmegaConf.merge(
        {"dataset": {"crop_padding": 4, "hflip": True}},
        {"augmentation": OmegaConf.load(REPO / f"configs/augmentation/{name}.yaml")},
    )
    fields = OmegaConf.to_container(cfg.augmentation, resolve=True)
    assert fields.pop("name") == name
    spec = Augmentation(**fields)
    assert (spec == Augmentation()) == (name == "none")
    assert not spec.trivial_augment  # every shipped preset must work on in-memory data


def test_typo_in_an_option_is_a_one_line_error():
    with pytest.raises(KdError, match="did you mean test_fraction"):
        load_dataset({"name": "digits", "tset_fraction": 0.2})


# ---------------------------------------------------------------------------------------------- digits


def test_digits_real_data_stratified_deterministic_split():
    data = load_dataset(dataset_node("digits"))
    train, test = data.train, data.test
    assert (len(train), len(test)) == (1797 - 540, 540)  # ceil(0.3 * 1797) in test
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert (data.num_classes, data.in_channels, data.input_size) == (10, 1, 8)
    per_class = torch.bincount(torch.cat([train.labels, test.labels]), minlength=10)
    assert torch.all((torch.bincount(test.labels, minlength=10) - 0.3 * per_class).abs() <= 1)

    again = load_dataset({"name": "digits", "split_seed": 0})
    other = load_dataset({"name": "digits", "split_seed": 1})
    assert torch.equal(again.test.images, test.images) and again.fingerprint == data.fingerprint
    assert not torch.equal(other.test.labels, test.labels) and other.fingerprint != data.fingerprint
    assert len(load_dataset({"name": "digits", "test_fraction": 0.5}).test) == 899


def test_the_stored_default_digits_split_is_scikit_learns_draw_and_the_pixels_are_its_digits():
    """kd reads the digits and their default split without importing scikit-learn (a faster start-up):
    both must stay exactly what scikit-learn's `load_digits` and stratified `train_test_split` give."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from kd_cli.data.digits import digits_arrays, stratified_split

    bunch = load_digits()
    pixels, labels = digits_arrays()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
    drawn = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0)
    stored = stratified_split(labels, 0.3, 0)
    assert all(np.array_equal(a, b) for a, b in zip(stored, drawn, strict=True))


def test_the_default_digits_start_without_scikit_learn():
    code = "import sys; "
    code += "from kd_cli.data import load_dataset; load_dataset({'name': 'digits'}); print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_synthetic_shapes_and_seed():
    node = {"name": "synthetic", "num_train": 50, "num_test": 20, "num_classes": 7, "channels": 1, "image_size": 12}
    data = load_dataset(node)
    assert data.train.images.shape == (50, 1, 12, 12) and len(data.test) == 20
    assert data.num_classes == 7 and int(data.train.labels.max()) < 7
    assert load_dataset(node).fingerprint == data.fingerprint
    assert load_dataset({**node, "seed": 1}).fingerprint != data.fingerprint


# ----------------------------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist_t10k() -> tuple[np.ndarray, np.ndarray]:
    if not MNIST_T10K.is_dir():
        pytest.skip(f"real MNIST test files not at {MNIST_T10K}")
    return load_mnist_t10k()


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_real_images_through_torchvision(tmp_path, mnist_t10k, name, folder):
    images, labels = mnist_t10k
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # README
    write_mnist_raw(tmp_path, images, labels, folder)
    data = load_dataset({**dataset_node(name), "root": str(tmp_path)})
    assert (len(data.train), len(data.test)) == (7000, 3000)
    assert data.train.images.shape == (7000, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(images[7000:].copy()))
    assert torch.equal(data.train.labels, torch.from_numpy(labels[:7000].astype(np.int64)))
    assert (data.num_classes, data.in_channels, data.input_size) == (10, 1, 28)


def test_mnist_corrupt_file_is_a_one_line_error(tmp_path, mnist_t10k):
    write_mnist_raw(tmp_path, *mnist_t10k)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(KdError, match="look corrupt") as error:
        load_dataset({"name": "mnist", "root": str(tmp_path)})
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)


# ----------------------------------------------------------------------------------------------- CIFAR


def accept_written_cifar(monkeypatch, cls: type[tv.CIFAR10], root: Path) -> None:
    """Point the class's md5 table at the files the test wrote, so its integrity check passes honestly."""
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[name, md5(folder / name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(folder / name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


@pytest.mark.parametrize("name, cls", [("cifar10", tv.CIFAR10), ("cifar100", tv.CIFAR100)])
def test_cifar_real_format_through_torchvision(tmp_path, monkeypatch, name, cls):
    train_hwc, train_labels, test_hwc, test_labels = write_cifar(tmp_path, cls, np.random.default_rng(0))
    accept_written_cifar(monkeypatch, cls, tmp_path)
    data = load_dataset({**dataset_node(name), "root": str(tmp_path)})
    assert torch.equal(data.train.images, torch.from_numpy(train_hwc).permute(0, 3, 1, 2))
    assert torch.equal(data.test.images, torch.from_numpy(test_hwc).permute(0, 3, 1, 2))
    assert data.train.labels.tolist() == train_labels and data.test.labels.tolist() == test_labels
    assert data.num_classes == len(data.class_names) == (100 if name == "cifar100" else 10)
    assert (data.in_channels, data.input_size) == (3, 32)


def test_cifar_checksum_mismatch_is_reported_as_corrupt(tmp_path):
    write_cifar(tmp_path, tv.CIFAR10, np.random.default_rng(0))  # md5s differ from the official files
    with pytest.raises(KdError, match=r"CIFAR-10 files under .* look corrupt") as error:
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ SVHN


def test_svhn_real_mat_format_through_torchvision(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    split_list = dict(tv.SVHN.split_list)
    written = {}
    for split, count in (("train", 9), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)  # SVHN's layout: H, W, C, N
        # SVHN's labels: 1..10, with 10 meaning digit 0; the test split's are among the training split's
        y = rng.integers(1, 11, (count, 1)) if split == "train" else rng.choice(written["train"][1], (count, 1))
        y = y.astype(np.uint8)
        url, filename, _ = split_list[split]
        sio.savemat(tmp_path / filename, {"X": x, "y": y})
        split_list[split] = [url, filename, md5(tmp_path / filename)]
        written[split] = (x, y)
    monkeypatch.setattr(tv.SVHN, "split_list", split_list)
    data = load_dataset({**dataset_node("svhn"), "root": str(tmp_path)})
    x, y = written["train"]
    assert torch.equal(data.train.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert data.train.labels.tolist() == [label % 10 for label in y[:, 0].tolist()]
    assert len(data.test) == 5 and data.class_names == [str(d) for d in range(10)]


# ------------------------------------------------------------------------------------ missing downloads


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", "MNIST/raw/"),
        ("fashion_mnist", "FashionMNIST/raw/"),
        ("cifar10", "cifar-10-batches-py/"),
        ("cifar100", "cifar-100-python/"),
        ("svhn", "train_32x32.mat"),
        ("imagefolder", "train/"),
    ],
)
def test_missing_data_names_the_folder_and_the_fix(tmp_path, name, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(KdError) as error:
        load_dataset({"name": name, "root": str(root), "download": False})
    message = str(error.value)
    assert "\n" not in message and str(root) in message and expected in message
    assert "dataset.download=true" in message or "dataset.root" in message


def test_failed_download_says_why(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv.CIFAR100, "download", offline)  # never touch the network from a test
    with pytest.raises(KdError, match=r"CIFAR-100: downloading into .* failed \(URLError: .*Name or service") as error:
        load_dataset({"name": "cifar100", "root": str(tmp_path), "download": True})
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------- image folders

COLOURS = {"apple": (200, 30, 30), "grape": (90, 20, 140), "lime": (60, 210, 40)}


def write_image_folder(root: Path, per_class: int, size=(12, 10)) -> None:
    for cls, colour in COLOURS.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, colour).save(root / cls / f"{i}.png")


def test_imagefolder_train_test_layout_and_loader(tmp_path):
    write_image_folder(tmp_path / "train", 4)
    write_image_folder(tmp_path / "val", 2)  # val/ stands in for test/
    data = load_dataset({**dataset_node("imagefolder"), "root": str(tmp_path), "image_size": 8, "val_fraction": 0})
    assert isinstance(data.train, FolderSplit) and (len(data.train), len(data.test)) == (12, 6) and data.val is None
    assert data.class_names == sorted(COLOURS) and (data.in_channels, data.input_size) == (3, 8)
    image, label = data.train.dataset[0]
    # no transform attached: the file's pixels as kd's one decoder reads them
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and label == 0

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    test = make_loader(
        data.test, batch_size=4, train=False, spec=None, mean=mean, std=std, device=CPU, seed=0, num_workers=0
    )
    batches = list(test)
    assert len(test) == len(batches) == 2 and test.num_samples == 6
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label in zip(images, labels):  # solid colours survive resize + centre crop exactly
        colour = torch.tensor(COLOURS[data.class_names[label]]) / 255
        expected = (colour - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(image.mean((1, 2)), expected, atol=1e-2)

    spec = Augmentation(crop_padding=4, hflip=True, erase_prob=0.5, trivial_augment=True)

    def train_batches():
        return list(
            make_loader(
                data.train, batch_size=5, train=True, spec=spec, mean=mean, std=std, device=CPU, seed=3, num_workers=0
            )
        )

    first = train_batches()
    torch.manual_seed(12345)  # the training loop's own use of the global RNG must not change the data
    second = train_batches()
    assert [b[0].shape for b in first] == [(5, 3, 8, 8), (5, 3, 8, 8), (2, 3, 8, 8)]
    assert same_batches(first, second)


def test_imagefolder_class_folders_alone_are_split(tmp_path):
    write_image_folder(tmp_path, 5)
    data = load_dataset({"name": "imagefolder", "root": str(tmp_path), "test_fraction": 0.4, "split_seed": 1})
    assert (len(data.train), len(data.test)) == (9, 6)
    test_labels = sorted(label for _, label in data.test.dataset)
    assert test_labels == [0, 0, 1, 1, 2, 2]  # stratified
    other = load_dataset({"name": "imagefolder", "root": str(tmp_path), "test_fraction": 0.4, "split_seed": 2})
    assert other.fingerprint != data.fingerprint


# ------------------------------------------------------------------------------------------ augmentation


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def test_crop_offsets_cover_exactly_zero_to_two_padding_uniformly():
    n, size, pad = 9000, 16, 4
    ones = torch.full((n, 1, size, size), 255, dtype=torch.uint8)
    out = augment_batch(ones, Augmentation(crop_padding=pad), torch.Generator().manual_seed(0))
    # The zero rows show the offset: dy < pad leaves pad - dy zero rows on top, dy > pad leaves them below.
    filled_rows = out[:, 0].amax(2) > 0
    top = filled_rows.int().argmax(1)
    bottom = size - filled_rows.flip(1).int().argmax(1)
    dy = torch.where(top > 0, pad - top, pad + (size - bottom))
    counts = torch.bincount(dy, minlength=2 * pad + 1)
    assert len(counts) == 2 * pad + 1 and counts.min() > 0  # every offset in [0, 2p], none outside
    share = counts.float() / n
    assert torch.all((share - 1 / (2 * pad + 1)).abs() < five_sigma(1 / (2 * pad + 1), n))
    filled_cols = out[:, 0].amax(1) > 0
    assert torch.all((out[:, 0] > 0).sum((1, 2)) == filled_rows.sum(1) * filled_cols.sum(1))  # a shifted window


def test_flip_happens_half_the_time():
    n = 20000
    x = torch.zeros(n, 1, 6, 6, dtype=torch.uint8)
    x[..., 0] = 255  # bright left column
    out = augment_batch(x, Augmentation(hflip=True), torch.Generator().manual_seed(1))
    flipped = out[:, 0, :, -1].amax(1) > 0
    assert torch.all(flipped != (out[:, 0, :, 0].amax(1) > 0))  # each image is exactly one of the two
    assert abs(flipped.float().mean().item() - 0.5) < five_sigma(0.5, n)


def test_rotation_angles_stay_within_range_and_fill_it():
    n, size, degrees = 2000, 33, 30.0
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, 15:18, 27:30] = 255  # a bright spot on the horizontal axis, 12 px right of the centre
    out = augment_batch(x, Augmentation(rotate_degrees=degrees), torch.Generator().manual_seed(2))
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    mass = out[:, 0].sum((1, 2))
    cy, cx = (out[:, 0].sum(2) * coords).sum(1) / mass, (out[:, 0].sum(1) * coords).sum(1) / mass
    angle = torch.rad2deg(torch.atan2(cy, cx)).abs()
    assert angle.max() <= degrees + 1.0 and angle.max() > degrees - 1.5
    assert abs((angle < degrees / 2).float().mean().item() - 0.5) < five_sigma(0.5, n)  # uniform |angle|
    assert torch.allclose(mass, torch.full_like(mass, 9.0), rtol=0.05)  # the spot is moved, not lost


def test_erasing_rate_and_area():
    n, prob = 4000, 0.25
    x = torch.full((n, 3, 20, 20), 255, dtype=torch.uint8)
    out = augment_batch(x, Augmentation(erase_prob=prob), torch.Generator().manual_seed(3))
    erased = (out == 0).all(1)  # all channels zeroed together
    area = erased.float().mean((1, 2))
    hit = area > 0
    assert abs(hit.float().mean().item() - prob) < five_sigma(prob, n)
    assert area[hit].min() >= 1 / 400 and area[hit].max() <= 0.45
    assert torch.all((out == 0).any(1) == erased)


def test_no_augmentation_is_exact_and_trivial_augment_is_refused_in_memory():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment_batch(x, Augmentation(), torch.Generator()), x.float() / 255)
    with pytest.raises(KdError, match="imagefolder"):
        augment_batch(x, Augmentation(trivial_augment=True), torch.Generator())
    with pytest.raises(KdError, match="trivial_augment=false"):
        make_loader(
            TensorSplit(x, torch.arange(4)),
            batch_size=2,
            train=True,
            spec=Augmentation(trivial_augment=True),
            mean=[0.5],
            std=[0.5],
            device=CPU,
            seed=0,
        )


def test_normalize_checks_channel_count():
    x = torch.ones(2, 3, 4, 4)
    assert torch.allclose(normalize(x, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    with pytest.raises(KdError, match="3 channel"):
        normalize(x, [0.5, 0.5], [0.2, 0.2])


# ------------------------------------------------------------------------------------------------ loader

MEAN, STD = [0.5], [0.25]


def labelled_split(n: int = 103, size: int = 12) -> TensorSplit:
    """Images that encode their label: constant value 2 * label everywhere."""
    labels = torch.arange(n) % 100
    images = (labels * 2).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return TensorSplit(images, labels)


def loader(split: TensorSplit, **kwargs):
    options = dict(batch_size=16, train=True, spec=None, mean=MEAN, std=STD, device=CPU, seed=0)
    return make_loader(split, **{**options, **kwargs})


def test_labels_stay_with_their_images_through_shuffle_and_augment():
    spec = Augmentation(crop_padding=2, hflip=True, rotate_degrees=10)
    batches = list(loader(labelled_split(), spec=spec))
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(labelled_split().labels.tolist())
    assert labels[:10].tolist() != list(range(10))  # shuffled
    for images, y in batches:
        centre = images[:, 0, 6, 6] * STD[0] + MEAN[0]  # crop, flip and rotation keep the centre pixel's value
        assert torch.equal(torch.round(centre * 255).long(), 2 * y)
        assert images.dtype == torch.float32 and y.dtype == torch.int64


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def by_sample(batches: list) -> torch.Tensor:
    """The batches' images in sample-id order (labels are sample ids here)."""
    return torch.cat([x for x, _ in batches])[torch.cat([y for _, y in batches]).argsort()]


def test_same_seed_and_epoch_same_batches_other_epoch_other_batches():
    spec = Augmentation(crop_padding=2, hflip=True, erase_prob=0.5)
    split = TensorSplit(torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    run = loader(split, spec=spec, seed=7)
    epoch0 = list(run)
    run.set_epoch(1)
    epoch1 = list(run)
    resumed = loader(split, spec=spec, seed=7)  # a fresh process resuming at epoch 1
    resumed.set_epoch(1)
    assert same_batches(list(resumed), epoch1) and same_batches(list(loader(split, spec=spec, seed=7)), epoch0)
    assert not torch.equal(epoch0[0][1], epoch1[0][1])
    assert not torch.equal(list(loader(split, spec=spec, seed=8))[0][1], epoch0[0][1])
    changed = (by_sample(epoch0) != by_sample(epoch1)).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # each epoch draws fresh augmentations
    single = loader(TensorSplit(split.images[:1], split.labels[:1]), spec=spec, seed=7)
    views = set()
    for epoch in range(8):  # one sample, so the order cannot change: only the augmentation stream can
        single.set_epoch(epoch)
        views.add(next(iter(single))[0].numpy().tobytes())
    assert len(views) > 1


def test_evaluation_is_sequential_and_unaugmented():
    split = labelled_split(40)
    test = loader(split, train=False, spec=Augmentation(crop_padding=4, hflip=True), batch_size=16)
    batches = list(test)
    assert len(test) == 3 and [len(y) for _, y in batches] == [16, 16, 8] and test.num_samples == 40
    assert torch.cat([y for _, y in batches]).tolist() == list(range(40))
    assert torch.allclose(batches[0][0], (split.images[:16].float() / 255 - 0.5) / 0.25)
    assert len(loader(split, train=False, batch_size=16, drop_last=True)) == 2


@pytest.mark.parametrize("train", [True, False])
def test_ddp_shards_are_disjoint_and_cover_the_data(train):
    n, world = 103, 3
    split = TensorSplit(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))  # label = sample id
    shards = []
    for rank in range(world):
        part = loader(split, train=train, rank=rank, world_size=world, batch_size=8)
        part.set_epoch(2)
        ids = torch.cat([y for _, y in part]).tolist()
        assert len(ids) == part.num_samples
        shards.append(set(ids))
    assert sum(map(len, shards)) == len(set().union(*shards))  # disjoint
    if train:  # equal sizes, so every rank takes the same number of steps; only n % world left out
        assert {len(s) for s in shards} == {n // world}
    else:  # evaluation counts every test sample exactly once
        assert set().union(*shards) == set(range(n))
