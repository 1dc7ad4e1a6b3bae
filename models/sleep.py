"""`sleep:<µs>` — a test backbone that costs no CPU: it waits, as a GPU kernel wait does.

A batch of N crops takes N × µs of wall time with the GIL released (`time.sleep`), whatever the view
size, so the service's own overhead (decode, render, batching, reduce) can be measured against a
known limit of 1e6 / µs crops/s. The embeddings are deterministic and cost next to nothing: 8 × 8
normalised pixels per channel on an even grid, times a fixed seeded projection to 1280 dimensions. Preprocessing is
`efficientnet_lite0`'s, so rendering costs what it costs for the default model. `sleep:0` is the
zero-cost forward. It runs eagerly only: a traced or OpenVINO graph would drop the wait.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from models.efficientnet import PREPROCESS
from models.registry import register_prefix
from models.spec import BuiltBackbone, ModelError, ModelOptions, ModelSpec

SLEEP_DIM = 1280
_POOLED = 3 * 8 * 8


class SleepBackbone(nn.Module):
    def __init__(self, microseconds_per_crop: int) -> None:
        super().__init__()
        self.seconds_per_crop = microseconds_per_crop / 1e6
        generator = torch.Generator().manual_seed(1280)
        self.projection: torch.Tensor
        self.register_buffer("projection", torch.randn(_POOLED, SLEEP_DIM, generator=generator) / _POOLED**0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seconds_per_crop > 0:
            time.sleep(self.seconds_per_crop * x.shape[0])  # releases the GIL, like waiting on a device
        # 8 × 8 pixels per channel on an even grid (a strided view: no copy of the batch), zero-padded below 8 px
        grid = x[:, :, :: max(1, x.shape[2] // 8), :: max(1, x.shape[3] // 8)][:, :, :8, :8]
        grid = nn.functional.pad(grid, (0, 8 - grid.shape[3], 0, 8 - grid.shape[2]))
        sampled = grid.float().flatten(1)
        out: torch.Tensor = sampled @ self.projection
        return out


@register_prefix("sleep")
def build_sleep(arch: str, options: ModelOptions) -> BuiltBackbone:
    if not arch.isdigit():
        raise ModelError(f"sleep:<microseconds per crop> takes a whole number, not {arch!r} (e.g. sleep:1000)")
    spec = ModelSpec(name=f"sleep:{int(arch)}", dim=SLEEP_DIM, preprocess=PREPROCESS,
                     weights_source="seeded projection (test backbone; waits instead of computing)")
    return BuiltBackbone(backbone=SleepBackbone(int(arch)), spec=spec, eager_only=True)
