"""What both peers share: the backbone as a user would load it, and the torchvision MeTTA views."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from models import BuiltBackbone, ModelOptions
from models import build_backbone as _build


def build_backbone(name: str, random_weights: bool = False) -> BuiltBackbone:
    """The registry's factory output (same weights as the service), not compiled by any engine."""
    return _build(name, ModelOptions(random_weights=random_weights))


def eager_model(name: str, random_weights: bool = False) -> tuple[nn.Module, T.Compose]:
    """What a first attempt runs: the eager fp32 module and torchvision's RandomResizedCrop + flip on PIL."""
    built = build_backbone(name, random_weights)
    pre = built.spec.preprocess
    interpolation = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    views = T.Compose([
        T.RandomResizedCrop(pre.input_size, scale=(0.25, 1.0), interpolation=interpolation),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
    return built.backbone.eval(), views


def pil_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def torchvision_views(image: Image.Image, transform: T.Compose, samples: int) -> torch.Tensor:
    return torch.stack([transform(image) for _ in range(samples)])
