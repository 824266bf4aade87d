"""Reading intermediate features by module name, through forward hooks.

Feature-distillation methods need a model's stage outputs and its embedding. Rather than a
`forward(x, is_feat=True)` protocol that every architecture must implement, every builder names
those modules (`set_feature_layers`), and `FeatureTap` hooks them, so a method works on any
`nn.Module` (including torchvision's, unchanged) and a user may tap any other module by name.

Caveat: a hooked output is the tensor the module returned, not a copy. A later in-place op on
that very tensor would change what the tap holds; the zoo here avoids in-place ops on stage outputs.

Pre-activation taps (`preactivation_sites`, `PreActivationTap`): methods such as OFD and AB read a
stage's features before its closing ReLU. A dry run finds, for each stage, which nn.ReLU call gives
them and which BatchNorm precedes that ReLU, and checks what it found; the tap then reads them on
every forward pass without changing the model's outputs.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_cli.errors import KdError


def set_feature_layers(model: nn.Module, stages: Iterable[str], embedding: str) -> nn.Module:
    """Record which modules give the stage outputs (shallow to deep) and the pooled embedding."""
    stages = list(stages)
    resolve_modules(model, [*stages, embedding])  # a builder naming a missing module is a bug: fail early
    # (the ignores: nn.Module's stubs allow only tensors and modules as attributes)
    model.kd_feature_layers = stages  # type: ignore[assignment]
    model.kd_embedding_layer = embedding  # type: ignore[assignment]
    return model


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map names to modules; an unknown name is a KdError listing the closest module names."""
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if name not in modules:
            raise _unknown_layer(model, name, modules)
        resolved[name] = modules[name]
    return resolved


def _unknown_layer(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> KdError:
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    stages = getattr(model, "kd_feature_layers", None)
    known = f" (this model's stages: {', '.join(stages)})" if stages else ""
    return KdError(
        f"no module named '{name}' in {type(model).__name__}{hint}{known}; use a name from model.named_modules()"
    )


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(o) for o in output)
    return output


class FeatureTap:
    """Collect the outputs of named modules during forward passes.

    >>> with FeatureTap(teacher, teacher.kd_feature_layers, detach=True) as tap:
    ...     logits = teacher(x)
    ...     feats = [tap.outputs[n] for n in teacher.kd_feature_layers]

    `detach=True` stores detached tensors, so a teacher's features carry no autograd graph.
    The hooks stay until `remove()` (or the end of the `with` block; `outputs` of the last pass
    stay readable after it). Each forward pass overwrites `outputs`; `clear()` empties it, so
    a step can drop its references to the previous step's activations.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False):
        self.names = list(dict.fromkeys(names))  # drop repeats: one hook per module
        self.detach = detach
        self.outputs: dict[str, Any] = {}
        modules = resolve_modules(model, self.names)
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def store(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = _detach(output) if self.detach else output

        return store

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def feature_shapes(
    model: nn.Module, names: Iterable[str], in_channels: int, input_size: int
) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each named module (batch dimension dropped), e.g. (C, H, W).

    Found by a dry run on two zero images in eval mode without gradients (two, because some
    layers reject a batch of one); each module's train/eval state is restored afterwards.
    """
    names = list(names)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    states = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with FeatureTap(model, names, detach=True) as tap, torch.no_grad():
            model(torch.zeros(2, in_channels, input_size, input_size, device=device, dtype=dtype))
            missing = [name for name in names if name not in tap.outputs]
            if missing:
                raise KdError(
                    f"module(s) {', '.join(missing)} did not run in {type(model).__name__}.forward; "
                    f"tap modules that the forward pass uses"
                )
            return {name: tuple(tap.outputs[name].shape[1:]) for name in names}
    finally:
        for module, training in states.items():
            module.training = training


# ---------------------------------------------------------------- pre-activation taps


@dataclass(frozen=True)
class PreActivation:
    """Where a stage's pre-activation (the tensor its closing ReLU is applied to) is read, by module name.

    `relu` is the nn.ReLU applied to it and `norm` the BatchNorm before that ReLU (None when none ran).
    A stage that ends in a ReLU (`after_stage` False): the input of `relu`'s last call during the stage's
    forward. A pre-activation network's stage returns an un-activated sum (WRN's blocks), which the next
    block normalises and activates (`after_stage` True): then it is the output of `norm`, the first
    BatchNorm to run after the stage, which reads the stage's output and whose output `relu` reads next
    (RepDistiller's and the OFD authors' WRN features: block2.layer[0].bn1(f1)).
    """

    layer: str
    relu: str
    norm: str | None
    after_stage: bool = False


class PreActivationTap:
    """Collect the pre-activations of the stages `sites` name (from `preactivation_sites`) during forward
    passes; `outputs[layer]`, as FeatureTap's (`detach`, `clear`, `remove`, `with`).

    In-place ReLUs (torchvision's inplace=True) would overwrite the input the tap keeps with its own
    output, so each `relu` a site reads is switched to inplace=False while tapped, and back on `remove()`.
    Rather than a copy in a pre-hook: the tap cannot know which call of a ReLU is the stage's last until
    the stage returns, so it would copy every call; out of place, the outputs are the same numbers and the
    kept input is the only extra tensor (autograd saves a ReLU's output, not its input)."""

    def __init__(self, model: nn.Module, sites: Iterable[PreActivation], detach: bool = False):
        self.sites = list(sites)
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        names = {n for site in self.sites for n in (site.layer, site.relu, site.norm) if n is not None}
        modules = resolve_modules(model, names)
        self._handles: list[Any] = []
        self._inplace: dict[nn.ReLU, bool] = {}
        for site in self.sites:
            relu = cast(nn.ReLU, modules[site.relu])  # preactivation_sites names nn.ReLU modules only
            self._inplace.setdefault(relu, relu.inplace)
            relu.inplace = False
            if site.after_stage:
                assert site.norm is not None  # an after_stage site reads its norm's output (_find_site)
                self._read_after(site, modules[site.layer], modules[site.norm])
            else:
                self._read_inside(site, modules[site.layer], relu)

    def _store(self, layer: str, tensor: torch.Tensor) -> None:
        self.outputs[layer] = tensor.detach() if self.detach else tensor

    def _read_inside(self, site: PreActivation, stage: nn.Module, relu: nn.Module) -> None:
        running = [False]  # only calls made while the stage runs count (a ReLU module may be shared)

        def enter(module: nn.Module, args: Any) -> None:
            running[0] = True

        def read(module: nn.Module, args: Any, output: Any) -> None:
            if running[0]:
                self._store(site.layer, args[0])  # each call overwrites: the stage's last one stays

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            running[0] = False

        # registered in this order, so a stage that is itself the ReLU reads before it leaves
        self._handles += [
            stage.register_forward_pre_hook(enter),
            relu.register_forward_hook(read),
            stage.register_forward_hook(leave),
        ]

    def _read_after(self, site: PreActivation, stage: nn.Module, norm: nn.Module) -> None:
        waiting = [False]

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            waiting[0] = True

        def read(module: nn.Module, args: Any, output: Any) -> None:
            if waiting[0]:
                waiting[0] = False
                self._store(site.layer, output)

        self._handles += [stage.register_forward_hook(leave), norm.register_forward_hook(read)]

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for relu, inplace in self._inplace.items():
            relu.inplace = inplace
        self._inplace = {}

    def __enter__(self) -> PreActivationTap:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@dataclass
class _Call:
    kind: str  # "enter" / "exit" (a named stage), "relu", "norm"
    name: str
    input: Any = None
    output: Any = None


def preactivation_sites(
    model: nn.Module,
    names: Iterable[str],
    in_channels: int,
    input_size: int,
    who: str = "reading pre-ReLU features",
    fix: str = "name such layers",
) -> list[PreActivation]:
    """Where each named stage's pre-activation is read (see PreActivation), found by a dry run, then checked
    by a second one through PreActivationTap itself: relu(pre-activation) must equal the stage's output
    (after_stage: the pre-activation must equal `norm` of the stage's output). A stage that fits neither
    is a one-line KdError, `who` and `fix` saying which method needs it and how to choose other layers.

    The BatchNorm before the ReLU: the last one that ran in the stage before the ReLU's last call among
    the ReLU's siblings (children of the same module), else the last that ran in the stage at all. The
    siblings come first because a residual block runs its projection shortcut's BatchNorm after its
    residual branch's (kd's and torchvision's BasicBlock), and the references take the branch's (bn2).

    Random images (a fixed seed) in eval mode, without gradients: zero images would make the outputs of a
    freshly initialised network all zero, where any tensor equals relu of any other."""
    names = list(names)
    stages = resolve_modules(model, names)
    module_names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        module_names.setdefault(module, name)
    relus = [m for m in module_names if isinstance(m, nn.ReLU)]
    calls: list[_Call] = []

    def record(kind: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls.append(_Call(kind, module_names[module], args[0] if args else None, output))

        return hook

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    images = torch.randn(2, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    images = images.to(device=device, dtype=dtype)
    states = {module: module.training for module in model.modules()}
    inplace = {relu: relu.inplace for relu in relus}
    handles = []
    try:
        model.eval()
        for relu in relus:
            relu.inplace = False  # an in-place ReLU would overwrite the input this run compares
            handles.append(relu.register_forward_hook(record("relu")))
        for module in module_names:
            if isinstance(module, _BatchNorm):
                handles.append(module.register_forward_hook(record("norm")))
        for name, stage in stages.items():
            handles.append(
                stage.register_forward_pre_hook(lambda module, args, name=name: calls.append(_Call("enter", name)))
            )
            handles.append(
                stage.register_forward_hook(
                    lambda module, args, output, name=name: calls.append(_Call("exit", name, output=output))
                )
            )
        with torch.no_grad():
            model(images)
        for handle in handles:
            handle.remove()
        handles = []
        for relu, flag in inplace.items():  # the check below runs the taps as they will run
            relu.inplace = flag
        sites = [_find_site(model, name, calls, who, fix) for name in names]
        _check_sites(model, sites, images, who, fix)
        return sites
    finally:
        for handle in handles:
            handle.remove()
        for relu, flag in inplace.items():
            relu.inplace = flag
        for module, training in states.items():
            module.training = training


def _find_site(model: nn.Module, name: str, calls: list[_Call], who: str, fix: str) -> PreActivation:
    start = next((i for i, c in enumerate(calls) if c.kind == "enter" and c.name == name), None)
    end = next((i for i, c in enumerate(calls) if c.kind == "exit" and c.name == name and i > (start or 0)), None)
    if start is None or end is None:
        raise KdError(
            f"{who}: module '{name}' did not run in {type(model).__name__}.forward; "
            f"tap modules that the forward pass uses"
        )
    out = calls[end].output
    inside = [i for i in range(start + 1, end) if calls[i].kind == "relu"]
    if isinstance(out, torch.Tensor) and inside:
        last = calls[inside[-1]]
        if _same(last.input.clamp_min(0), out):  # relu(x) = max(x, 0)
            norms = [calls[i] for i in range(start + 1, inside[-1]) if calls[i].kind == "norm"]
            parent = last.name.rpartition(".")[0]
            siblings = [c for c in norms if c.name.rpartition(".")[0] == parent]
            norm = next(reversed(siblings or norms), None)  # the last one, if any
            return PreActivation(name, last.name, norm.name if norm else None)
    after = calls[end + 1 :]
    norm_at = next((i for i, c in enumerate(after) if c.kind == "norm"), None)
    if isinstance(out, torch.Tensor) and norm_at is not None and _same(after[norm_at].input, out):
        norm = after[norm_at]
        relu = next((c for c in after[norm_at + 1 :] if c.kind == "relu"), None)
        if relu is not None and _same(relu.input, norm.output):
            return PreActivation(name, relu.name, norm.name, after_stage=True)
    raise KdError(
        f"{who} needs layers that end in an nn.ReLU module (e.g. the stages of cifar resnets, cnn, wrn, "
        f"vgg), but '{name}' of {type(model).__name__} does not: its output is not relu() of its last "
        f"nn.ReLU call's input, nor normalised by a BatchNorm that an nn.ReLU reads next; {fix}"
    )


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _check_sites(model: nn.Module, sites: Sequence[PreActivation], images: torch.Tensor, who: str, fix: str) -> None:
    """The taps as they will run: relu(pre-activation) is the stage's output, or (after_stage) the
    pre-activation is `norm` of the stage's output; a later in-place op on it would show here."""
    layers = [site.layer for site in sites]
    with (
        torch.no_grad(),
        FeatureTap(model, layers, detach=True) as stages,
        PreActivationTap(model, sites, detach=True) as tap,
    ):
        model(images)
    modules = resolve_modules(model, [site.norm for site in sites if site.after_stage and site.norm is not None])
    for site in sites:
        pre, out = tap.outputs.get(site.layer), stages.outputs[site.layer]
        if pre is None:
            ok = False
        elif site.after_stage:
            assert site.norm is not None  # an after_stage site reads its norm's output (_find_site)
            with torch.no_grad():
                expected = modules[site.norm](out)
            ok = pre.shape == expected.shape and torch.allclose(pre, expected, rtol=1e-5, atol=1e-6)
        else:
            ok = _same(pre.clamp_min(0), out)
        if not ok:
            raise KdError(
                f"{who}: the pre-activation read at '{site.layer}' of {type(model).__name__} (through "
                f"'{site.relu}') does not give the layer's output back (changed in place afterwards?); "
                f"{fix}"
            )


def classifier_module(model: nn.Module) -> nn.Module | None:
    """The layer that maps the embedding to class scores: timm's `get_classifier()`, else the last Linear."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter) and isinstance(getter(), nn.Module):
        return getter()
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of `model` but its classifier's (fine-tuning gives those their own rate)."""
    classifier = classifier_module(model)
    head = {id(p) for p in classifier.parameters()} if classifier is not None else set()
    return [p for p in model.parameters() if id(p) not in head]


class Embedding(nn.Identity):
    """Passes the classifier's input through, so a forward hook on this module reads the embedding."""

    def before_classifier(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])


def tap_classifier_input(model: nn.Module, classifier: nn.Module | None) -> str:
    """Add `model.kd_embedding`, called on the classifier's input by a pre-hook: a module whose output is
    the embedding, for networks built elsewhere (timm, transformers) whose state dict keys must not
    change. The hook is a bound method of that submodule, so copy.deepcopy keeps it pointing at the copy's."""
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise KdError(f"{type(model).__name__} has no classifier module to read the embedding from")
    model.kd_embedding = Embedding()
    classifier.register_forward_pre_hook(model.kd_embedding.before_classifier)
    return "kd_embedding"
