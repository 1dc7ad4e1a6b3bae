"""A tiny deterministic backbone for fast tests: real convolutions, fixed seeded weights, 16-d."""

from __future__ import annotations

import torch
from torch import nn

from models.registry import register
from models.spec import BuiltBackbone, ModelOptions, ModelSpec, Preprocess

DUMMY_DIM = 16


class DummyBackbone(nn.Module):
    """conv → ReLU → conv → global average pool: responds to content, position and scale."""

    def __init__(self, dim: int = DUMMY_DIM) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, kernel_size=5, stride=4, padding=2)
        self.conv2 = nn.Conv2d(8, dim, kernel_size=3, stride=2, padding=1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.conv2(x)
        return x.mean(dim=(2, 3))


@register("dummy")
def build_dummy(options: ModelOptions) -> BuiltBackbone:
    spec = ModelSpec(
        name="dummy",
        dim=DUMMY_DIM,
        preprocess=Preprocess(input_size=64, resize_size=73, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        weights_source="seeded random (test backbone)",
    )
    return BuiltBackbone(backbone=DummyBackbone(), spec=spec)
