"""The small base class every distillation method derives from (mdistiller's `Distiller` shape).

A method is an nn.Module that owns the student and any learnable adapters; it receives the
teacher but does not register it as a submodule, so the teacher is never optimised, never saved
with the student, and never part of the resume state (it is reloaded from its own weights).
`forward(images, labels)` returns the student's logits and a dict of named, already weighted
loss terms; the engine sums the terms and logs each one. A term whose weight is 0 is left out (not
computed, not logged), and `loss_weights` names the options that weight the terms, so that a config
in which all of them are 0 is refused before any work (`validate_options`).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.methods.feature_utils import embedding_layer, feature_layers, require_maps
from kd_cli.methods.logit_utils import kd_loss
from kd_cli.methods.seg_logits import align_to, pixel_kd_loss, valid_pixels
from kd_cli.models.features import FeatureTap, feature_shapes
from kd_cli.registry import NonNegative, Temperature
from kd_cli.tasks import Task, get_task


class TeacherOutputs(Protocol):
    """What a method reads from the teacher cache the loop attaches (engine/teacher_cache.TeacherCache):
    the teacher's outputs for a training batch, computed by `teacher`/`compute` when not stored."""

    def logits(self, images: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...

    def outputs(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]: ...


# The largest teacher feature (values per sample) the teacher cache stores: a 2048-d embedding of a
# 50,000-image epoch is 400 MB in fp32.
CACHED_FEATURE_SIZE = 2048


class Distiller(nn.Module, metaclass=ABCMeta):
    requires_teacher = True
    # True for methods with a per-sample memory (CRD): forward then gets a third argument, the
    # batch's sample indices in the training split (in-memory data sets only).
    needs_index = False
    # Methods with an initialisation phase (FSP, FT): its epochs, the first of trainer.epochs, train
    # other parameters than the rest, so some get no gradient in some steps (DDP must be told: `phased`).
    init_epochs = 0
    # The options that weight the method's loss terms: every method names its own, and at least one
    # of them must be > 0 (validate_options). `method_name` is set by register_method.
    loss_weights: tuple[str, ...] = ()
    method_name = "?"
    # True for methods that read the teacher only through `teacher_logits`: its outputs may then come
    # from the teacher cache (engine/teacher_cache.py) instead of running it (see teacher_cache_outputs).
    reads_teacher_logits_only = False
    # The tasks (kd_cli/tasks) the method's losses are written for: a method is refused, before any work,
    # on a data set of another task. `task` is the run's, set by build_method (its loss is the `ce` term).
    tasks: tuple[str, ...] = ("classification",)
    task: Task
    # Plain attributes set through __dict__ in __init__ (not submodules); declared here so that they are
    # not typed through nn.Module.__getattr__. The loop attaches the teacher cache.
    teacher: nn.Module | None
    teacher_outputs: TeacherOutputs | None

    @classmethod
    def validate_options(cls, **options: Any) -> None:
        """The rules that tie options together, before anything is built: the registry calls this with
        every option, defaults filled in. Subclasses add theirs and call super(). Here: some term of the
        loss has a weight > 0."""
        require_a_loss_term(cls.method_name, cls.loss_weights, options)

    def __init__(self, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.epoch, self.epochs = 0, 1
        self.__dict__["teacher"] = teacher  # plain attribute: not a submodule (see module docstring)
        self.__dict__["teacher_outputs"] = None  # the teacher cache, when the loop attaches one
        self.__dict__["task"] = get_task("classification")  # the run's task: build_method sets it
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's BN statistics and dropout stay frozen
        return self

    @property
    def phased(self) -> bool:
        return self.init_epochs > 0

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the loop before each epoch (0-based), for schedules such as DKD's warm-up."""
        if self.init_epochs >= epochs > 0 and self.phased:
            raise KdError(
                f"method.init_epochs={self.init_epochs} leaves none of trainer.epochs={epochs} for the "
                f"training that follows method={self.method_name}'s initialisation phase; raise "
                f"trainer.epochs or lower method.init_epochs"
            )
        self.epoch, self.epochs = epoch, epochs

    def teacher_cache_outputs(self) -> list[str] | None:
        """What the teacher cache stores for this method beside the teacher's logits: the names of the
        teacher layers whose features it reads ([] for the logits alone), or None when the cache cannot
        serve it (the method reads more of the teacher than that)."""
        return [] if self.reads_teacher_logits_only else None

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for a training batch: from the teacher cache when one is attached."""
        assert self.teacher is not None  # only methods that require a teacher read its logits
        if self.teacher_outputs is not None and self.training:
            return self.teacher_outputs.logits(images, self.teacher)
        return self.teacher(images)

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits and the named, weighted loss terms for one batch."""

    def auxiliary_terms(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The task loss of a student's auxiliary head on this batch (`aux`), whatever the method: a segmenter
        built with aux_loss=true leaves its auxiliary logits on the forward pass (models/torchvision_segmentation)."""
        aux = self.student.__dict__.pop("kd_aux_logits", None)
        if aux is None:
            return {}
        from kd_cli.models.torchvision_segmentation import AUX_WEIGHT

        return {"aux": AUX_WEIGHT * self.task.loss(aux, labels)}

    def peer_models(self) -> dict[str, nn.Module]:
        """Networks trained beside `student` (online distillation, e.g. DML's cohort): name -> network.
        The loop scores each every evaluation epoch (`NAME_test_top1`, ...) and on the test split at the
        end; the stage saves each as its own model (`peers/NAME` in the run). None for offline methods."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Learnable state beyond the student (adapters, memory banks): saved for resume only."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}


class FeatureDistiller(Distiller):
    """Base of the methods that compare intermediate features ("deep" distillation).

    Features are read by forward hooks on named modules (`FeatureTap`), so any nn.Module works.
    `student_layers` / `teacher_layers` name the modules; null picks the method's default from the
    models' own lists (`default_layers`). Their shapes come from a dry run, so adapters are sized
    automatically. Every feature method can add the cross-entropy term and Hinton's KD term
    (`ce_weight`, `kd_weight`, `temperature`), as the literature does for FitNet, CRD and others.

    These five options are declared here, once: a subclass declares its own and passes `**common` on
    (`def __init__(self, student, teacher, *, at_weight: NonNegative, **common: Any)`), and the method
    registry reads both (`registry.entry_parameters`). Option values are checked by the registry from the
    annotations (`temperature: Temperature`, ...) and `validate_options`, before the models are built;
    `__init__` checks only what needs the models (layer names, feature shapes).
    """

    # True for methods that compare one layer of each model (CRD's embeddings, SRD's last stage): a layer
    # list, when given, must then name exactly one.
    single_layer = False
    teacher: nn.Module  # a feature method always has one (its __init__ takes no None)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        student_layers: list[str] | None,
        teacher_layers: list[str] | None,
        ce_weight: NonNegative,
        kd_weight: NonNegative,
        temperature: Temperature,
    ):
        super().__init__(student, teacher)
        self.student_layers = list(student_layers or self.default_layers(student))
        self.teacher_layers = list(teacher_layers or self.default_layers(teacher))
        if not (student_layers or teacher_layers) and len(self.student_layers) != len(self.teacher_layers):
            raise KdError(
                f"method={self.method_name} pairs the models' stages, but the student "
                f"{type(student).__name__} has {len(self.student_layers)} and the teacher "
                f"{type(teacher).__name__} {len(self.teacher_layers)}; pick a student with as many stages "
                f"(e.g. student=cnn for the cnn teacher) or name the layers (method.student_layers / teacher_layers)"
            )
        check_layer_counts(self.student_layers, self.teacher_layers)  # with the defaults filled in
        self.student_shapes = _shapes(student, self.student_layers)
        self.teacher_shapes = _shapes(teacher, self.teacher_layers)
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature

    @classmethod
    def validate_options(
        cls, *, student_layers: list[str] | None = None, teacher_layers: list[str] | None = None, **options: Any
    ) -> None:
        """Before any model exists: some term has a weight, and layer lists given for both models pair up
        (one layer each for a `single_layer` method)."""
        super().validate_options(**options)
        for role, layers in (("student", student_layers), ("teacher", teacher_layers)):
            if cls.single_layer and layers and len(layers) != 1:
                raise KdError(
                    f"method={cls.method_name} compares one layer of each model; method.{role}_layers "
                    f"names {len(layers)} layers, give one (or null for the method's default)"
                )
        if student_layers and teacher_layers:
            check_layer_counts(student_layers, teacher_layers)

    def require_maps(self) -> None:
        """For methods on feature maps: every chosen layer of both models gives (C, H, W) features."""
        for role, layers, shapes in (
            ("student", self.student_layers, self.student_shapes),
            ("teacher", self.teacher_layers, self.teacher_shapes),
        ):
            for layer, shape in zip(layers, shapes):
                require_maps(self.method_name, role, layer, shape)

    def default_layers(self, model: nn.Module) -> list[str]:
        """The stage outputs, shallow to deep; methods on the embedding override this."""
        return list(feature_layers(model))

    def student_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with FeatureTap(self.student, self.student_layers) as tap:
            logits = self.student(images)
        return logits, [tap.outputs[name] for name in self.student_layers]

    def features(
        self, images: torch.Tensor, own_weight: float
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, list[torch.Tensor]]:
        """(student logits, student features, teacher logits, teacher features). The teacher runs only when
        a term reads it, the method's own (weighted by `own_weight`) or KD; otherwise None and []."""
        logits, student = self.student_features(images)
        if not (own_weight or self.kd_weight):
            return logits, student, None, []
        teacher_logits, teacher = self.teacher_features(images)
        return logits, student, teacher_logits, teacher

    def teacher_cache_outputs(self) -> list[str] | None:
        """Small vectors (pooled embeddings: PKT, RKD, CC, CRD) are stored with the logits; feature maps are
        not (a CIFAR-100 epoch of stage maps would take gigabytes), so a method on maps runs its teacher."""
        if all(len(shape) == 1 and shape[0] <= CACHED_FEATURE_SIZE for shape in self.teacher_shapes):
            return list(self.teacher_layers)
        return None

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's logits and features: from the teacher cache when one is attached."""
        if self.teacher_outputs is not None and self.training:
            logits, *features = self.teacher_outputs.outputs(images, self._teacher_pass)
        else:
            logits, *features = self._teacher_pass(images)
        return logits, list(features)

    def _teacher_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with FeatureTap(self.teacher, self.teacher_layers, detach=True) as tap:
            logits = self.teacher(images)
        return (logits, *(tap.outputs[name] for name in self.teacher_layers))

    def logit_terms(
        self, logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The task loss and Hinton's KD term; on a segmenter's per-pixel logits, KD is pixel-wise (pixel_kd's
        loss over the labelled pixels, the teacher's map resized to the student's)."""
        terms = {}
        if self.ce_weight:
            terms["ce"] = self.ce_weight * self.task.loss(logits, labels)
        if self.kd_weight:
            assert teacher_logits is not None  # `features` runs the teacher whenever kd_weight > 0
            if logits.dim() == 4:
                teacher_logits = align_to(teacher_logits, logits)
                soft = pixel_kd_loss(
                    logits.float(), teacher_logits.float(), self.temperature, valid_pixels(labels, logits)
                )
            else:
                soft = kd_loss(logits.float(), teacher_logits.float(), self.temperature)
            terms["kd"] = self.kd_weight * soft
        return terms


class HeadMapDistiller(FeatureDistiller):
    """Base of the segmentation methods on one map of each model, by default the head's last hidden map
    (before its classifier, CIRKD's features[-1]): SKD, IFVD, CIRKD. A subclass declares its own options and
    passes `**common` on, as every feature method does."""

    tasks = ("segmentation",)
    single_layer = True

    def __init__(self, student: nn.Module, teacher: nn.Module, **common: Any):
        super().__init__(student, teacher, **common)
        self.require_maps()

    def default_layers(self, model: nn.Module) -> list[str]:
        return [embedding_layer(model)]


def require_a_loss_term(method: str, weights: Sequence[str], options: Mapping[str, Any]) -> None:
    """A one-line KdError when every option in `weights` is 0: the loss would be 0 whatever the student
    does, so training would "complete" having learned nothing."""
    if not weights or any(options.get(w) != 0 for w in weights):
        return
    keys = [f"method.{w}" for w in weights]
    if len(keys) == 1:
        raise KdError(
            f"method={method}: its only loss weight {keys[0]} is 0, so nothing would be learned; give it a weight > 0"
        )
    raise KdError(
        f"method={method}: every loss weight is 0 ({', '.join(keys)}), so nothing would be learned; "
        f"give one a weight > 0"
    )


def check_layer_counts(student_layers: list[str], teacher_layers: list[str]) -> None:
    if len(student_layers) != len(teacher_layers):
        raise KdError(
            f"method.student_layers has {len(student_layers)} layer(s) but method.teacher_layers has "
            f"{len(teacher_layers)}; name as many of each (they are paired in order)"
        )


def embedding_layers(model: nn.Module) -> list[str]:
    """The pooled embedding before the classifier, for methods that compare sample relations."""
    return [embedding_layer(model)]


def _shapes(model: nn.Module, layers: list[str]) -> list[tuple[int, ...]]:
    shape = getattr(model, "kd_input_shape", None)
    if shape is None:
        raise KdError(f"{type(model).__name__} was not built by kd's model registry; its input shape is unknown")
    found = feature_shapes(model, layers, shape[0], shape[1])
    return [found[name] for name in layers]
