"""Model registry and model families. Importing this package registers every family: each module here
defines its builders with `@register_model` (timm style: one file per family; timm and transformers
themselves are imported on use)."""

from kd_cli.models.registry import (
    MODELS,
    check_model_options,
    create_model,
    list_models,
    model_task,
    register_model,
)
from kd_cli.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["MODELS", "check_model_options", "create_model", "list_models", "model_task", "register_model"]
