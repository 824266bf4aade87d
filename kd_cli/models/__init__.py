"""Model registry and model families. Importing this package registers every family."""

from kd_cli.models.registry import MODELS, check_model_options, create_model, list_models, register_model

# Each import registers its family's builders (timm style: one file per family).
from kd_cli.models import small  # noqa: F401,E402
from kd_cli.models import cifar_resnet, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2  # noqa: F401,E402
from kd_cli.models import torchvision_models, timm_models, hf_models  # noqa: F401,E402  (timm/hf: imported on use)

__all__ = ["MODELS", "check_model_options", "create_model", "list_models", "register_model"]
