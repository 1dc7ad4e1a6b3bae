"""Serve round 1's code (main at f1762a5, from a worktree on PYTHONPATH) with a zero-cost `sleep:0` model.

Round 1 had no `sleep:` test backbone, so its ceiling with a forward that costs nothing could not be
measured as it shipped. This launcher registers one in round 1's own registry — the same work as
`models.sleep` at 0 µs: pool the normalised views to 8 × 8 per channel, project to 1280 dimensions —
and then runs round 1's `metta-serve` unchanged:

    PYTHONPATH=/tmp/metta-f1762a5 python bench/baseline_sleep.py --model sleep:0 --mode eager --port P

It imports only what the worktree provides (run as a script, not as `bench.…`), so every line of the
service under test is round 1's.
"""

# mypy: ignore-errors
# (it imports round 1's registry from the worktree on PYTHONPATH, not this tree's: checked against that code)

from __future__ import annotations

import torch
from torch import nn

from models.efficientnet import PREPROCESS  # round 1's modules, from the worktree
from models.registry import BuiltBackbone, ModelSpec, register_prefix
from service.cli import serve_main


class ZeroCostBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1280)
        self.register_buffer("projection", torch.randn(192, 1280, generator=generator) / 192**0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1) @ self.projection


@register_prefix("sleep")
def build(arch: str, options: object) -> BuiltBackbone:
    if arch != "0":
        raise SystemExit("this launcher serves sleep:0 only")
    spec = ModelSpec(name="sleep:0", dim=1280, preprocess=PREPROCESS, weights_source="zero-cost test backbone")
    return BuiltBackbone(backbone=ZeroCostBackbone(), spec=spec)


if __name__ == "__main__":
    serve_main()
