"""Backbones: a registry of named models, each with its preprocessing, loaded for one device."""

from models.registry import (
    LoadedModel,
    ModelError,
    ModelOptions,
    ModelSpec,
    Preprocess,
    available_models,
    create_model,
    register,
    register_prefix,
)

__all__ = [
    "LoadedModel",
    "ModelError",
    "ModelOptions",
    "ModelSpec",
    "Preprocess",
    "available_models",
    "create_model",
    "register",
    "register_prefix",
]
