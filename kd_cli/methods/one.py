"""`method=one`: Lan, Zhu & Gong, "Knowledge Distillation by On-the-Fly Native Ensemble" (NeurIPS 2018).

One network with `branches` heads on a shared trunk: each branch is the student's last stage and
everything after it (pooling, classifier; for a WRN its last block group and final BN-ReLU), the trunk
everything before (as the authors branch a ResNet's last block group). A gate on the trunk's output
(global average pool, linear layer to one score per branch, BatchNorm, ReLU, softmax: the authors'
`control_v1`/`bn_v1`) weighs the branches' logits into an ensemble, the teacher built on the fly:

    z_e = sum_i g_i z_i
    loss = sum_i ce_weight * CE(z_i, y) + ensemble_weight * CE(z_e, y)
           + sum_i one_weight * T^2 KL(softmax(z_e / T) || softmax(z_i / T))

the ensemble a fixed target in the KL terms (the authors detach it), KL averaged over the batch, T = 3.
The authors add 1e-7 to the target probabilities before the logarithm; kd does not (the difference is
below 1e-6 on their losses), so the term is exactly the KD term kd uses everywhere.

Branch 1 is the run's student; branch k is a peer (`branchK`): the same trunk (shared parameters) with
its own, newly initialised head, scored every evaluation epoch and saved as a model of its own in
`peers/branchK`, as DML's peers. The trunk runs once per step however many branches there are: while
the branches run, each trunk module called again with the very tensors it already saw returns its
first output (`SharedTrunk`), so its BatchNorm statistics move once and every branch's gradient
reaches the one trunk graph, as in the authors' single multi-branch forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods import register_method
from kd_cli.methods.base import Distiller
from kd_cli.methods.feature_utils import feature_layers, full_precision, input_shape
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.registry import NonNegative, Range, Temperature

BranchCount = Annotated[int, Range(2, 16)]  # one branch is no ensemble; 16 run at once


def ensemble_logits(branch_logits: list[torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
    """(B, K) gate weights (rows sum to 1) times K (B, C) branch logits -> the (B, C) ensemble logits."""
    stacked = torch.stack([full_precision(z) for z in branch_logits], dim=1)  # (B, K, C)
    return (gate.unsqueeze(2) * stacked).sum(dim=1)


def one_losses(
    branch_logits: list[torch.Tensor], gate: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Unweighted terms: each branch's CE, the ensemble's CE, each branch's T^2 KL to the fixed ensemble."""
    ensemble = ensemble_logits(branch_logits, gate)
    ce = [F.cross_entropy(full_precision(z), labels) for z in branch_logits]
    kl = [kd_loss(full_precision(z), ensemble.detach(), temperature) for z in branch_logits]
    return ce, F.cross_entropy(ensemble, labels), kl


def call_order(model: nn.Module) -> list[str]:
    """The names of `model`'s modules in the order they are first called, from a dry forward pass."""
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
        for name, module in model.named_modules()
        if name
    ]
    channels, height, width = input_shape(model)
    param = next(model.parameters())
    states = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, channels, height, width, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in states.items():
            module.training = training
    return list(dict.fromkeys(order))


def head_modules(model: nn.Module) -> set[str]:
    """The branch: every module first called after the student's second-to-last stage (the last stage and
    what follows it: pooling, classifier; for a WRN its last block group and final BN-ReLU). Its first
    module's input is the trunk's output."""
    stages = list(feature_layers(model))
    if len(stages) < 2:
        raise KdError(
            f"method=one shares a trunk and gives each branch the student's last stage, but "
            f"{type(model).__name__} has {len(stages)} stage(s); pick a student with several (e.g. cnn)"
        )
    order = call_order(model)
    inside = f"{stages[-2]}."
    return {name for name in order[order.index(stages[-2]) + 1 :] if not name.startswith(inside)}


def branch_entry(model: nn.Module, head: set[str]) -> str:
    """The first module of the branch: the one that receives the trunk's output."""
    return next(name for name in call_order(model) if name in head)


def graft_trunk(peer: nn.Module, student: nn.Module, head: set[str]) -> list[nn.Module]:
    """Make `peer` share every module and parameter of `student` outside `head` (the trunk), keeping its own
    head; returns the shared trunk modules that were put in place (the ones `SharedTrunk` memoises)."""
    shared: list[nn.Module] = []

    def walk(prefix: str, peer_module: nn.Module, student_module: nn.Module) -> None:
        for key in ("_parameters", "_buffers"):  # e.g. a ViT's position embedding on the root module
            getattr(peer_module, key).update(getattr(student_module, key))
        for name in list(peer_module._modules):
            full = prefix + name
            if full in head:
                continue
            peer_child, student_child = peer_module._modules[name], student_module._modules[name]
            # (a None entry is a placeholder, with no submodules and nothing to share; kd's models have none)
            assert peer_child is not None and student_child is not None
            if any(h.startswith(full + ".") for h in head):
                walk(full + ".", peer_child, student_child)
            else:
                peer_module._modules[name] = student_child
                shared.append(student_child)

    walk("", peer, student)
    return shared


class SharedTrunk:
    """While active, a trunk module called again with the same tensor objects returns its first output.

    The branches all run the trunk on the same batch; the first run computes, the later ones reuse its
    outputs (the same tensors, so one autograd graph collects every branch's gradient). The arguments
    are kept alive until the block ends, so an id is never reused by another tensor meanwhile."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.memo: dict[tuple[int, ...], tuple[tuple[Any, ...], Any]] = {}

    def __enter__(self) -> SharedTrunk:
        for module in self.modules:
            module.forward = self._memoised(module, module.forward)
        return self

    def _memoised(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            key = (id(module), *(id(a) for a in args))
            if not kwargs and key in self.memo:
                return self.memo[key][1]
            output = forward(*args, **kwargs)
            if not kwargs:
                self.memo[key] = (args, output)
            return output

        return run

    def __exit__(self, *exc: Any) -> None:
        for module in self.modules:
            del module.forward  # back to the class's forward
        self.memo.clear()


class GateNorm(nn.BatchNorm1d):
    """The gate's BatchNorm; a batch of one sample (an epoch's last, at some sizes) is normalised by the
    running statistics, where BatchNorm in training mode would fail."""

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.training and len(scores) == 1:
            return F.batch_norm(
                scores, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(scores)


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) maps or (B, N, D) tokens -> (B, C) / (B, D): the gate's input."""
    return features.flatten(2).mean(2) if features.dim() == 4 else features.mean(1) if features.dim() == 3 else features


@register_method("one")
class OnTheFlyNativeEnsemble(Distiller):
    requires_teacher = False  # the gated ensemble of the branches is the teacher
    loss_weights = ("ce_weight", "ensemble_weight", "one_weight")

    def __init__(
        self,
        student,
        teacher=None,
        *,
        new_student: Callable[[], nn.Module],
        branches: BranchCount,
        ce_weight: NonNegative,
        ensemble_weight: NonNegative,
        one_weight: NonNegative,
        temperature: Temperature,
    ):
        super().__init__(student, None)
        head = head_modules(student)
        self.branch_entry = student.get_submodule(branch_entry(student, head))
        self.peers = nn.ModuleList()
        for _ in range(branches - 1):
            peer = new_student()
            self.trunk = graft_trunk(peer, student, head)
            self.peers.append(peer)
        # the gate learns from the ensemble's CE alone (the KL terms take the ensemble as a fixed target):
        # without that term there is nothing to learn it from, and the ensemble is the branches' mean
        self.gate = (
            nn.Sequential(nn.Linear(self._trunk_width(), branches), GateNorm(branches), nn.ReLU())
            if ensemble_weight
            else None
        )
        self.ce_weight, self.ensemble_weight, self.one_weight = ce_weight, ensemble_weight, one_weight
        self.temperature = temperature

    def _trunk_width(self) -> int:
        found: list[torch.Tensor] = []
        handle = self.branch_entry.register_forward_pre_hook(lambda m, args: found.append(args[0]))
        try:
            call_order(self.student)  # a dry pass, in eval mode
        finally:
            handle.remove()
        return pooled(found[0]).shape[1]

    def peer_models(self) -> dict[str, nn.Module]:
        return {f"branch{k}": peer for k, peer in enumerate(self.peers, 2)}

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        trunk: list[torch.Tensor] = []
        handle = self.branch_entry.register_forward_pre_hook(lambda m, args: trunk.append(args[0]))
        try:
            with SharedTrunk(self.trunk):
                branch_logits = [self.student(images), *(peer(images) for peer in self.peers)]
        finally:
            handle.remove()
        if self.gate is not None:
            gate = F.softmax(self.gate(full_precision(pooled(trunk[0]))), dim=1)
        else:
            gate = torch.full((len(images), len(branch_logits)), 1 / len(branch_logits), device=images.device)
        ce, ensemble_ce, kl = one_losses(branch_logits, gate, labels, self.temperature)
        terms = {}
        for prefix, branch_ce, branch_kl in zip(["", *(f"{name}_" for name in self.peer_models())], ce, kl):
            if self.ce_weight:
                terms[f"{prefix}ce"] = self.ce_weight * branch_ce
            if self.one_weight:
                terms[f"{prefix}one"] = self.one_weight * branch_kl
        if self.ensemble_weight:
            terms["ensemble_ce"] = self.ensemble_weight * ensemble_ce
        return branch_logits[0], terms
