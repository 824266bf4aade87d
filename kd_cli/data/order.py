"""The order of a split's samples: seeds of (seed, epoch, stream) and each rank's share. Shared by the
loaders of every task (data/loader.py, data/box_loader.py)."""

from __future__ import annotations

import hashlib

import torch


def epoch_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed from (seed, epoch, stream): independent streams that never collide across epochs."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard(order: torch.Tensor, rank: int, world_size: int, equal: bool) -> torch.Tensor:
    """This rank's disjoint share of `order`; `equal` trims the tail so all shares have one length."""
    if equal:
        order = order[: len(order) - len(order) % world_size]
    return order[rank::world_size]
