"""Execution engines: how a built backbone runs on its device (eager, TorchScript, OpenVINO)."""

from __future__ import annotations

import torch

from models.registry import BuiltBackbone, LoadedModel, ModelError, ModelOptions, fingerprint, weights_digest

MODES = ("auto", "eager", "torchscript", "openvino")


def compile_backbone(built: BuiltBackbone, options: ModelOptions) -> LoadedModel:
    if options.mode not in MODES:
        raise ModelError(f"unknown execution mode {options.mode!r}; choose one of {', '.join(MODES)}")
    device = torch.device(options.device)
    mode = "eager" if options.mode == "auto" else options.mode
    if mode != "eager":
        raise ModelError(f"execution mode {mode!r} is not implemented yet")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[options.dtype]
    backbone = built.backbone.eval().to(device=device, memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return backbone(x.to(dtype=dtype, memory_format=torch.channels_last))

    if dtype != torch.float32:
        backbone.to(dtype)
    return LoadedModel(
        built.spec,
        run,
        device=device,
        dtype=options.dtype,
        mode=mode,
        fingerprint=fingerprint(weights_digest(built.backbone), built.spec, options.dtype, mode),
        head=built.head,
    )
