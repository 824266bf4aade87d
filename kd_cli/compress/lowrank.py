"""Low-rank factorisation by truncated SVD (Denton et al., 2014; Jaderberg et al., 2014).

A conv W (out, in, k, k), seen as a matrix (out, in*k*k), becomes U_r S_r V_r^T: a k x k conv to
`rank` channels (S_r^1/2 V_r^T) followed by a 1x1 conv back to `out` channels (U_r S_r^1/2) that
keeps the bias. A linear layer becomes two linear layers the same way. A layer is factorised only
where that saves parameters; model.json records each layer's rank and load rebuilds the pair.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Literal, TypeGuard, cast

import torch
from torch import nn

from kd_cli.compress import register_step
from kd_cli.compress.context import StepContext
from kd_cli.compress.step import CompressionStep
from kd_cli.compress.surgery import check_layers, layer_map, set_submodule
from kd_cli.errors import KdError
from kd_cli.registry import OpenFraction

log = logging.getLogger("kd")


@register_step("lowrank")
class LowRank(CompressionStep):
    """rank_ratio: kept rank as a share of each layer's full rank; energy (instead, when set): the
    smallest rank whose singular values keep this share of sum(s^2); layers: all | conv | linear;
    skip: layer names left whole."""

    def __init__(
        self,
        rank_ratio: OpenFraction,
        energy: OpenFraction | None,
        layers: Literal["all", "conv", "linear"],
        skip: list[str],
    ):
        self.rank_ratio, self.energy, self.layers, self.skip = rank_ratio, energy, layers, list(skip)

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        self.check(model)
        ranks = {}
        for name, module in self._candidates(layer_map(model)):
            matrix = _as_matrix(module.weight.detach()).double()
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            rank = self._rank(s)
            if not _saves(rank, matrix.shape):
                continue  # a factorisation this wide would not save parameters
            set_submodule(model, name, factorise(module, rank, (u, s, vh)))
            ranks[name] = rank
        if not ranks:
            raise KdError(NOTHING_SMALLER)
        log.info(f"lowrank: {len(ranks)} layers factorised")
        ctx.record(kind=self.name, rank_ratio=self.rank_ratio, energy=self.energy, ranks=ranks)
        return model

    @staticmethod
    def rebuild(model: nn.Module, record: dict) -> nn.Module:
        for name, rank in record["ranks"].items():
            layer = cast("nn.Conv2d | nn.Linear", model.get_submodule(name))  # the kinds `apply` factorises
            set_submodule(model, name, factorise(layer, int(rank), None))
        return model

    def check(self, model: nn.Module | Mapping[str, nn.Module]) -> None:
        """What can be checked before factorising (see compress.check_steps): the skipped layers are conv
        or linear layers of the model, some layer is left to factorise and, with rank_ratio (the ranks
        follow from the shapes), some layer would get smaller. With energy the ranks come from the SVD."""
        layers = layer_map(model)
        check_layers(
            layers,
            self.skip,
            "compression.lowrank.skip",
            (nn.Conv2d, nn.Linear),
            "it factorises (and skips) conv and linear layers, by their own names",
        )
        candidates = self._candidates(layers)
        if not candidates:
            kinds = {"all": "Conv2d (groups=1) and Linear", "conv": "Conv2d (groups=1)", "linear": "Linear"}[
                self.layers
            ]
            raise KdError(
                f"compression.lowrank has no layer to factorise: layers={self.layers} takes {kinds} layers "
                f"and this model has none outside skip"
            )
        if self.energy is None and not any(self._smaller_by_ratio(m) for _, m in candidates):
            raise KdError(NOTHING_SMALLER)

    def layers_after(self, layers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """The layer names the steps after this one will see (compress.check_steps): each layer X this
        step may factorise gains X.0 and X.1, of X's kind; with rank_ratio, X is then a Sequential."""
        after = dict(layers)
        for name, module in self._candidates(layers):
            if self.energy is None and not self._smaller_by_ratio(module):
                continue
            after[f"{name}.0"] = after[f"{name}.1"] = module
            if self.energy is None:
                after[name] = nn.Sequential()
        return after

    def _candidates(self, layers: Mapping[str, nn.Module]) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
        return [(name, m) for name, m in layers.items() if name not in self.skip and self._eligible(m)]

    def _eligible(self, module: nn.Module) -> TypeGuard[nn.Conv2d | nn.Linear]:
        if isinstance(module, nn.Conv2d):
            return self.layers in ("all", "conv") and module.groups == 1
        return isinstance(module, nn.Linear) and self.layers in ("all", "linear")

    def _rank(self, s: torch.Tensor) -> int:
        if self.energy is not None:
            kept = torch.cumsum(s**2, 0) / (s**2).sum()
            return int(torch.searchsorted(kept, torch.tensor(self.energy, dtype=kept.dtype)).item()) + 1
        return self._ratio_rank(len(s))

    def _ratio_rank(self, full_rank: int) -> int:
        return max(1, math.ceil(self.rank_ratio * full_rank))

    def _smaller_by_ratio(self, module: nn.Conv2d | nn.Linear) -> bool:
        """Whether rank_ratio factorises `module` (its rank follows from the shape: no SVD needed)."""
        rows, cols = module.weight.shape[0], math.prod(module.weight.shape[1:])
        return _saves(self._ratio_rank(min(rows, cols)), (rows, cols))


NOTHING_SMALLER = (
    "compression.lowrank factorised no layer: at this rank none would get smaller; lower rank_ratio (or energy)"
)


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


Pair = tuple[int, int]


def _saves(rank: int, shape: tuple[int, ...]) -> bool:
    """Whether factors of this rank hold fewer parameters than the (rows, cols) matrix they replace."""
    return rank * sum(shape) < math.prod(shape)


def factorise(module: nn.Conv2d | nn.Linear, rank: int, svd) -> nn.Sequential:
    """The (first, second) pair replacing `module`; filled from `svd` = (u, s, vh) when given."""
    bias = module.bias is not None
    first: nn.Conv2d | nn.Linear
    second: nn.Conv2d | nn.Linear
    if isinstance(module, nn.Conv2d):
        # torch types a conv's geometry as tuple[int, ...]: a Conv2d's holds two ints (padding may be a str)
        geometry = cast(
            "tuple[Pair, Pair, str | Pair, Pair]", (module.kernel_size, module.stride, module.padding, module.dilation)
        )
        first = nn.Conv2d(module.in_channels, rank, *geometry, bias=False, padding_mode=module.padding_mode)
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
            if module.bias is not None:
                assert second.bias is not None  # built with bias=bias
                second.bias.copy_(module.bias)
    return pair
