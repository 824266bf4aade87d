"""The order of a split's samples: seeds of (seed, epoch, stream) and each rank's share, and what every
in-memory loader shares (`InMemoryBatches`: data/loader.py's TensorLoader, data/box_loader.py's BoxLoader)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from kd_cli.data.augment import Augmentation, channel_stats


def epoch_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed from (seed, epoch, stream): independent streams that never collide across epochs."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard(order: torch.Tensor, rank: int, world_size: int, equal: bool) -> torch.Tensor:
    """This rank's disjoint share of `order`; `equal` trims the tail so all shares have one length."""
    if equal:
        order = order[: len(order) - len(order) % world_size]
    return order[rank::world_size]


class InMemoryBatches:
    """An in-memory split's batches, task aside: its settings, each epoch's order (shuffled from (seed, epoch)
    identically on every rank, then this rank's shard), its length, and what decides its stream besides the
    data (the teacher cache's key). A subclass holds the samples and yields its batches."""

    kind = "memory"  # (stream_identity: the loaders of two kinds never share a stream)

    def __init__(
        self,
        count: int,
        channels: int,
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
        self.count = count
        self.mean, self.std = channel_stats(mean, std, channels, device, torch.float32)
        self.batch_size, self.spec = batch_size, spec
        self.device, self.seed, self.drop_last = device, seed, drop_last
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.num_samples = len(shard(torch.arange(count), rank, world_size, equal=shuffle))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stream_identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "augmentation": None if self.spec is None else asdict(self.spec),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def __len__(self) -> int:
        whole, part = divmod(self.num_samples, self.batch_size)
        return whole if self.drop_last else whole + (part > 0)

    def epoch_order(self) -> torch.Tensor:
        """This rank's samples of the epoch, in order (CPU)."""
        order = torch.arange(self.count)
        if self.shuffle:  # drawn on the CPU, identically on every rank, so the shards never overlap
            order = torch.randperm(
                self.count, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, "order"))
            )
        return shard(order, self.rank, self.world_size, equal=self.shuffle)

    def augment_generator(self) -> torch.Generator:
        """The epoch's augmentation stream on the device, one per rank."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, self.epoch, f"augment/rank{self.rank}"))
        return generator
