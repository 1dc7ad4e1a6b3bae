"""The model registry: names → factories, each entry with its own preprocessing and embedding size.

A backbone here maps a float batch (B, 3, H, W), already normalised, to the global pooled
pre-logits embedding (B, dim). `LoadedModel` wraps it with what the rest of the service needs:
normalisation of uint8 views, the execution engine, the device and a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
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


Factory = Callable[[ModelOptions], BuiltBackbone]
PrefixFactory = Callable[[str, ModelOptions], BuiltBackbone]
_REGISTRY: dict[str, Factory] = {}
_PREFIXES: dict[str, PrefixFactory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Register a factory under `name`. Names are unique: registering one twice is a bug."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def register_prefix(prefix: str) -> Callable[[PrefixFactory], PrefixFactory]:
    """Register a family addressed as `prefix:<architecture>` (e.g. `timm:resnet50`)."""

    def wrap(factory: PrefixFactory) -> PrefixFactory:
        if prefix in _PREFIXES:
            raise ModelError(f"model prefix {prefix!r} is registered twice")
        _PREFIXES[prefix] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    _load_builtin_families()
    return sorted(_REGISTRY)


def create_model(name: str, options: ModelOptions | None = None) -> LoadedModel:
    """Build a registered model, ready to embed uint8 views on `options.device`."""
    options = options or ModelOptions()
    _load_builtin_families()
    prefix, _, arch = name.partition(":")
    if name in _REGISTRY:
        built = _REGISTRY[name](options)
    elif arch and prefix in _PREFIXES:
        built = _PREFIXES[prefix](arch, options)
    else:
        families = ", ".join(f"'{p}:<name>'" for p in sorted(_PREFIXES))
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(available_models())}; "
                         f"or any architecture of {families}")
    from models.execution import compile_backbone  # execution engines live in their own module

    return compile_backbone(built, options)


def _load_builtin_families() -> None:
    # Importing a family module runs its @register decorators.
    from models import dummy, efficientnet, zoo  # noqa: F401


def weights_digest(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict, in order, names included."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(weights_sha: str, spec: ModelSpec, dtype: str, mode: str) -> str:
    """A short id: equal fingerprints mean comparable embeddings (same weights, pixels, numerics)."""
    payload = json.dumps(
        {"weights": weights_sha, "preprocess": asdict(spec.preprocess), "dim": spec.dim,
         "dtype": dtype, "mode": mode},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class LoadedModel:
    """A backbone ready to serve: `embed_views(uint8 batch) -> float32 (B, dim)` on the CPU."""

    def __init__(
        self,
        spec: ModelSpec,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        device: torch.device,
        dtype: str,
        mode: str,
        fingerprint: str,
        head: nn.Linear | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.mode = mode
        self.fingerprint = fingerprint
        self.head = head
        self._run = run
        mean = torch.tensor(spec.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._mean = mean.to(device)
        self._std = std.to(device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float32 normalised with the model's mean and std, on its device."""
        if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[1] != 3:
            raise ModelError(f"expected a uint8 (B, 3, H, W) batch, got {views.dtype} {tuple(views.shape)}")
        views = views.to(self.device, non_blocking=True)
        # In place on the fresh float copy: half the time of `(x - mean) / std` (two fewer full-batch tensors)
        return views.float().sub_(self._mean).div_(self._std)

    def embed_views(self, views: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, dim), float32 on the CPU, for a batch of same-size uint8 views."""
        with torch.inference_mode():
            out = self._run(self.normalize(views))
            return out.float().cpu()
