"""The 1,000 ImageNet-1k class names, in class-index order, from torchvision's weights metadata.

torchvision ships the names inside the package (`Weights.meta["categories"]`); reading them downloads
nothing, so the service stays offline. Every ImageNet-1k head (EfficientNet-Lite0, the ResNets, timm's
`*.in1k` models) uses this same class order.
"""

from __future__ import annotations

from functools import cache

IMAGENET_CLASSES = 1000


@cache
def imagenet_labels() -> tuple[str, ...]:
    from torchvision.models import ResNet50_Weights

    names = tuple(str(name) for name in ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != IMAGENET_CLASSES:
        raise RuntimeError(f"torchvision's ImageNet metadata has {len(names)} classes, expected 1000")
    return names


def labels_for(classes: int) -> tuple[str, ...] | None:
    """Names for a head with `classes` outputs: ImageNet's for 1,000, else none (callers use the index)."""
    return imagenet_labels() if classes == IMAGENET_CLASSES else None
