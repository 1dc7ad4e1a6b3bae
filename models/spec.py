"""What a backbone is: its preprocessing, its spec, the options a caller may choose, what a factory builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


class ModelError(ValueError):
    """A model cannot be created as asked (unknown name, missing or mismatched weights, bad mode)."""


@dataclass(frozen=True)
class Preprocess:
    """How pixels reach the network: `center` resizes the shorter side to resize_size, crops input_size."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # "bilinear" | "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ModelError(f"interpolation must be bilinear or bicubic, not {self.interpolation!r}")
        if not 0 < self.input_size <= self.resize_size:
            raise ModelError("need 0 < input_size <= resize_size")


@dataclass(frozen=True)
class ModelOptions:
    """What a caller may choose about a model; the factory decides what it supports."""

    device: str = "cpu"
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16" (CUDA)
    mode: str = "auto"  # "auto" | "eager" | "torchscript" | "openvino"
    weights: str | None = None  # path to a state_dict / .safetensors / TorchScript file
    random_weights: bool = False  # only for tests and speed benchmarks
    threads: int | None = None  # intra-op threads on CPU


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    preprocess: Preprocess
    weights_source: str = field(default="")


@dataclass
class BuiltBackbone:
    """What a factory returns: the eval-mode pooled-embedding module, its spec and (if any) its head."""

    backbone: nn.Module
    spec: ModelSpec
    head: nn.Linear | None = None
    eager_only: bool = False  # a module whose work a traced or compiled graph would drop (the sleep backbone)
