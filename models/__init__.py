"""Backbones: a registry of named models, each with its preprocessing, loaded for one device.

`build_backbone(name)` gives the plain eval-mode module (no engine); `create_model(name, options)`
builds it and compiles it for its device and engine (`models.execution`). Importing this package
registers the built-in families.
"""

from models import dummy, efficientnet, sleep, zoo  # noqa: F401  (their @register decorators run on import)
from models.execution import compile_backbone
from models.loaded import LoadedModel
from models.registry import available_models, build_backbone, register, register_prefix
from models.spec import BuiltBackbone, ModelError, ModelOptions, ModelSpec, Preprocess


def create_model(name: str, options: ModelOptions | None = None) -> LoadedModel:
    """Build a registered model, ready to embed uint8 views on `options.device`."""
    options = options or ModelOptions()
    return compile_backbone(build_backbone(name, options), options)


__all__ = [
    "BuiltBackbone",
    "LoadedModel",
    "ModelError",
    "ModelOptions",
    "ModelSpec",
    "Preprocess",
    "available_models",
    "build_backbone",
    "compile_backbone",
    "create_model",
    "register",
    "register_prefix",
]
