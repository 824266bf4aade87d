"""Low-rank factorisation by truncated SVD (Denton et al., 2014; Jaderberg et al., 2014).

A conv W (out, in, k, k), seen as a matrix (out, in*k*k), becomes U_r S_r V_r^T: a k x k conv to
`rank` channels (S_r^1/2 V_r^T) followed by a 1x1 conv back to `out` channels (U_r S_r^1/2) that
keeps the bias. A linear layer becomes two linear layers the same way. A layer is factorised only
where that saves parameters; model.json records each layer's rank and load rebuilds the pair.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import nn

from kd_cli.compress import register_step
from kd_cli.compress.context import StepContext
from kd_cli.compress.layers import check_layer_names, set_submodule
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction

log = logging.getLogger("kd")


@register_step("lowrank")
class LowRank:
    """rank_ratio: kept rank as a share of each layer's full rank; energy (instead, when set): the
    smallest rank whose singular values keep this share of sum(s^2); layers: all | conv | linear;
    skip: layer names left whole."""

    def __init__(self, rank_ratio: OpenFraction, energy: OpenFraction | None, layers: Literal["all", "conv", "linear"],
                 skip: list[str]):
        self.rank_ratio, self.energy, self.layers, self.skip = rank_ratio, energy, layers, list(skip)

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        check_layer_names(model, self.skip, "compression.lowrank.skip")
        ranks = {}
        for name, module in list(model.named_modules()):
            if name in self.skip or not self._eligible(module):
                continue
            matrix = _as_matrix(module.weight.detach()).double()
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            rank = self._rank(s)
            if rank * sum(matrix.shape) >= matrix.numel():
                continue  # a factorisation this wide would not save parameters
            set_submodule(model, name, factorise(module, rank, (u, s, vh)))
            ranks[name] = rank
        if not ranks:
            raise KdError("compression.lowrank factorised no layer: at this rank none would get smaller; lower "
                          "rank_ratio (or energy)")
        log.info(f"lowrank: {len(ranks)} layers factorised")
        ctx.record(kind=self.name, rank_ratio=self.rank_ratio, energy=self.energy, ranks=ranks)
        return model

    @staticmethod
    def rebuild(model: nn.Module, record: dict) -> nn.Module:
        for name, rank in record["ranks"].items():
            set_submodule(model, name, factorise(model.get_submodule(name), int(rank), None))
        return model

    def _eligible(self, module: nn.Module) -> bool:
        if isinstance(module, nn.Conv2d):
            return self.layers in ("all", "conv") and module.groups == 1
        return isinstance(module, nn.Linear) and self.layers in ("all", "linear")

    def _rank(self, s: torch.Tensor) -> int:
        if self.energy is not None:
            kept = torch.cumsum(s**2, 0) / (s**2).sum()
            return int(torch.searchsorted(kept, torch.tensor(self.energy, dtype=kept.dtype)).item()) + 1
        return max(1, math.ceil(self.rank_ratio * len(s)))


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def factorise(module: nn.Module, rank: int, svd) -> nn.Sequential:
    """The (first, second) pair replacing `module`; filled from `svd` = (u, s, vh) when given."""
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        first = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding,
                          module.dilation, bias=False, padding_mode=module.padding_mode)
        second = nn.Conv2d(rank, module.out_channels, 1, bias=bias)
    else:
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, module.out_features, bias=bias)
    pair = nn.Sequential(first, second).to(module.weight.device, module.weight.dtype)
    if svd is not None:
        u, s, vh = (t[..., :rank] if i == 0 else t[:rank] for i, t in enumerate(svd))
        root = s.sqrt()
        with torch.no_grad():
            first.weight.copy_((root[:, None] * vh).reshape(first.weight.shape))
            second.weight.copy_((u * root[None, :]).reshape(second.weight.shape))
            if bias:
                second.bias.copy_(module.bias)
    return pair
