"""Batches for the training loop: normalised float images and int64 labels, already on the device.

In-memory splits live on the device as uint8 and are shuffled, sliced and augmented there; image folders
go through a DataLoader with torchvision.transforms.v2. Both are deterministic in (seed, epoch): a run
resumed at epoch k sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
)

from kd_cli.data.augment import (
    Augmentation,
    augment_batch,
    augment_pair,
    channel_stats,
    check_in_memory,
)
from kd_cli.data.base import BoxSplit, FolderSplit, TensorSplit, folder_samples
from kd_cli.data.images import UnreadableImage
from kd_cli.data.order import InMemoryBatches, epoch_seed, shard
from kd_cli.errors import KdError

if TYPE_CHECKING:
    from kd_cli.data.box_loader import BoxLoader
    from kd_cli.data.decode import CroppedBatches
    from kd_cli.data.mask_stream import PairTransformed

Batch = tuple[torch.Tensor, torch.Tensor]


def make_loader(
    split: TensorSplit | FolderSplit | BoxSplit,
    *,
    batch_size: int,
    train: bool,
    spec: Augmentation | None,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    seed: int,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
) -> TensorLoader | FolderLoader | BoxLoader:
    """A loader with `set_epoch`, `__iter__` -> (images, labels) on `device`, `__len__` and `num_samples`.

    With `world_size` > 1 each rank gets its own shard: for training, disjoint and of equal size (the
    last len % world_size samples of each epoch's shuffle are left out, so every rank takes the same
    number of steps); for evaluation, disjoint and covering every sample (sizes differ by at most one),
    so metrics summed over ranks count each test image once.
    """
    if batch_size < 1:
        raise KdError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    spec = spec if train else None  # evaluation never augments
    device = torch.device(device)
    if isinstance(split, BoxSplit):  # detection: images with their box lists (data/box_loader.py)
        from kd_cli.data.box_loader import BoxLoader

        return BoxLoader(split, batch_size, spec, mean, std, device, seed, drop_last, rank, world_size, train)
    if isinstance(split, TensorSplit):
        return TensorLoader(split, batch_size, spec, mean, std, device, seed, drop_last, rank, world_size, train)
    return FolderLoader(
        split, batch_size, spec, mean, std, device, seed, drop_last, rank, world_size, train, num_workers
    )


class TensorLoader(InMemoryBatches):
    """Shuffles, slices, augments and normalises an in-memory split, all on its device."""

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        spec: Augmentation | None,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        shuffle: bool,
    ):
        if spec is not None:
            check_in_memory(spec)  # fail before the first epoch, not after the data moved to the device
        channels = split.images.shape[1]
        super().__init__(
            len(split.labels), channels, batch_size, spec, mean, std, device, seed, drop_last, rank, world_size, shuffle
        )
        self.images = split.images.to(device)  # once: uint8 is 4x smaller than float
        self.labels = split.labels.to(device)
        # Methods with a per-sample memory (CRD) need each sample's index in the split: a third item.
        self.with_index = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:  # a Batch, plus each sample's index with `with_index`
        order = self.epoch_order().to(self.device)
        generator = self.augment_generator()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images, labels = self.images[index], self.labels[index]
            if self.spec is not None and labels.dim() == 3:  # segmentation: the masks move with the images
                images, labels = augment_pair(images, labels, self.spec, generator)
            elif self.spec is not None:
                images = augment_batch(images, self.spec, generator)
            else:
                images = images.float().div_(255.0)
            images = images.sub_(self.mean).div_(self.std)
            if labels.dim() == 3:
                labels = labels.long()  # masks are stored as uint8 (4x smaller on the device)
            yield (images, labels, index) if self.with_index else (images, labels)


class FolderLoader:
    """A DataLoader over an image folder, yielding batches on `device`.

    Training with random-resized crops (and no TrivialAugment, which works on single images) takes the
    fast path (data/decode.py): uint8 crops cut per batch in the workers, then flip/rotation/erasing,
    float conversion and normalisation batched on the device. Otherwise, and for evaluation, each image
    goes through torchvision.transforms.v2 in the workers."""

    def __init__(
        self,
        split: FolderSplit,
        batch_size: int,
        spec: Augmentation | None,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        shuffle: bool,
        num_workers: int,
    ):
        samples = folder_samples(split.dataset)
        self.batched = spec is not None and spec.crop_padding > 0 and not spec.trivial_augment and samples is not None
        collate = None
        dataset: CroppedBatches | Transformed | PairTransformed
        if split.task == "segmentation":  # streamed (image, mask) pairs: data/mask_stream.py
            from kd_cli.data.mask_stream import PairTransformed, SegmentationPairs

            pair_transform = SegmentationPairs(spec, split.image_size, mean, std)
            dataset = PairTransformed(split.dataset, pair_transform)
            transform = f"segmentation pairs: {'training crops' if spec else 'whole images'} of {split.image_size}"
            if spec is None:
                batch_size = 1  # each test image whole, at its stored size: scored at full resolution
        elif self.batched:
            from kd_cli.data.decode import CroppedBatches, keep_batch

            assert spec is not None and samples is not None  # as self.batched says
            dataset = CroppedBatches(samples, split.image_size, seed, spec.hflip)
            collate = keep_batch
            self.batch_spec = replace(spec, crop_padding=0, hflip=False)  # the workers crop and flip
            self.mean, self.std = channel_stats(mean, std, 3, device, torch.float32)
            transform = f"batched: torchvision.io, random resized crop {split.image_size}, then {self.batch_spec}"
        else:
            transform = folder_transform(spec, split.image_size, mean, std, split.crop_fraction)
            dataset = Transformed(split.dataset, transform)
        self.dataset = dataset
        self.device, self.seed, self.rank, self.num_workers = device, seed, rank, num_workers
        # Workers draw the random transforms from seeds dealt in turn: their number shapes the stream too.
        self.identity = {
            "kind": "folder",
            "seed": seed,
            "batch_size": batch_size,
            "drop_last": drop_last,
            "rank": rank,
            "world_size": world_size,
            "shuffle": shuffle,
            "num_workers": num_workers,
            "transform": repr(transform),
            "mean": list(mean),
            "std": list(std),
        }
        self.epoch = 0
        # Seeds both the shuffle and the workers' random transforms; re-seeded from (seed, epoch) per epoch.
        self.generator = torch.Generator()
        self.sampler = _sampler(dataset, shuffle, seed, rank, world_size, self.generator)
        if self.batched and isinstance(self.sampler, RandomSampler):
            # persistent workers keep their iterator, which draws from the generator otherwise than a new one
            self.sampler = EpochPermutation(len(dataset), seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            drop_last=drop_last,
            generator=self.generator,
            collate_fn=collate,
            # the batched path's draws do not come from the workers' seeds, so its workers may live on
            persistent_workers=self.batched and num_workers > 0,
        )
        self.num_samples = len(self.sampler)

    def stream_identity(self) -> dict[str, Any]:
        return self.identity

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, (DistributedSampler, EpochPermutation)):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, "folder"))
        if self.batched:
            cast("CroppedBatches", self.dataset).set_epoch(self.epoch)  # (shared memory: persistent workers read it)
            augment = torch.Generator(device=self.device)
            augment.manual_seed(epoch_seed(self.seed, self.epoch, f"folder-batch/rank{self.rank}"))
        batches = iter(self.loader)
        finished = False
        try:
            for step in range(len(self.loader)):
                try:
                    images, labels = self._next(batches, step)
                except UnreadableImage as error:
                    # From a worker, torch re-raises it with the worker's traceback in the message; the class
                    # keeps its own line of it. Raised afresh, without the chain, so only that line is shown.
                    raise UnreadableImage(str(error)) from None
                if self.batched:
                    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                if self.batched:
                    images = augment_batch(images, self.batch_spec, augment).sub_(self.mean).div_(self.std)
                yield images, labels
            finished = True
        finally:
            # Stop the workers now, on an error or an early stop too: left to the garbage collector (the
            # traceback keeps this frame alive), their shutdown waits out torch's 5 s join timeout per worker.
            # Persistent workers (the batched path) live on after a whole epoch, for the next one.
            if not (finished and self.loader.persistent_workers):
                self._stop_workers(batches)

    def _stop_workers(self, batches) -> None:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if self.loader.persistent_workers:
            self.loader._iterator = None  # (DataLoader would reuse the stopped workers next epoch)

    def _next(self, batches: Iterator[Batch], step: int) -> Batch:
        if self.num_workers > 0 or self.batched:  # (the batched path draws from its own seeds)
            return next(batches)  # workers are seeded from self.generator already
        # Without workers the transforms draw from the global RNG: seed a private copy of it per batch.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, self.epoch, f"batch{step}/rank{self.rank}"))
            return next(batches)


class Transformed(Dataset):
    """Applies `transform` to the image of each (image, label) pair; the split itself stays transform-free."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # a map-style data set (an ImageFolder, or a Subset of one)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


def folder_transform(
    spec: Augmentation | None, size: int, mean: Sequence[float], std: Sequence[float], crop_fraction: float = 0.875
):
    """RandomResizedCrop/flip/TrivialAugment/rotation/erasing as `spec` asks; Resize+CenterCrop otherwise.

    On image folders `crop_padding` > 0 switches on RandomResizedCrop (padding itself means nothing for
    images of arbitrary size), so augmentation=standard does the usual ImageNet-style crop.
    """
    from torchvision.transforms import v2

    spec = spec or Augmentation()
    steps: list = [v2.ToImage()]
    if spec.crop_padding:
        steps.append(v2.RandomResizedCrop(size, antialias=True))
    else:  # the evaluation crop: resize to size / crop_fraction (ImageNet's usual 0.875), keep the centre
        steps += centre_crop(size, crop_fraction)
    if spec.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if spec.trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    if spec.rotate_degrees:
        steps.append(v2.RandomRotation(spec.rotate_degrees))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if spec.erase_prob:  # before Normalize: erased pixels are black, as on the in-memory path
        steps.append(v2.RandomErasing(p=spec.erase_prob, value=0))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def centre_crop(size: int, crop_fraction: float) -> list:
    """Resize the short side to size / crop_fraction, then cut the central size x size square."""
    from torchvision.transforms import v2

    if crop_fraction >= 1.0:
        return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return [v2.Resize(round(size / crop_fraction), antialias=True), v2.CenterCrop(size)]


class EpochPermutation(Sampler):
    """A shuffle drawn from (seed, epoch) alone, as TensorLoader's order."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.epoch = count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, "order"))
        return iter(torch.randperm(self.count, generator=generator).tolist())


def _sampler(
    dataset: CroppedBatches | Transformed | PairTransformed,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    generator: torch.Generator,
):
    count = len(dataset)
    if world_size > 1 and shuffle:
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if world_size > 1:
        return shard(torch.arange(count), rank, world_size, equal=False).tolist()
    if shuffle:
        return RandomSampler(dataset, generator=generator)
    return list(range(count))
