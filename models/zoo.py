"""Other backbones: torchvision ResNets by name and any timm architecture as `timm:<name>`.

Weights come from `ModelOptions.weights` (a state_dict `.pt/.pth`, a `.safetensors` file or a
TorchScript archive whose parameters are taken), else from torchvision's / timm's local caches.
Nothing is downloaded: without weights a model refuses to start unless `random_weights=True`.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import nn

from models.registry import register, register_prefix
from models.spec import BuiltBackbone, ModelError, ModelOptions, ModelSpec, Preprocess

# The classic ImageNet recipe, used when the weights come without their own preprocessing config.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIC = Preprocess(input_size=224, resize_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a weights file, by format; no pickled code is ever executed."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    if _is_torchscript(path):
        with warnings.catch_warnings():
            # torch.jit is deprecated upstream; reading an archive's parameters is still what we want
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            archive = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return dict(archive.state_dict())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path} is not a state_dict, .safetensors or TorchScript file: {exc}") from exc
    for key in ("state_dict", "model"):  # training checkpoints nest the weights one level down
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return state


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], head_name: str) -> bool:
    """Load strictly, except that the classifier (`head_name`) may be absent. True if it was loaded."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise ModelError(f"weights do not fit {type(model).__name__}: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    head_missing = [k for k in missing if k.startswith(head_name + ".")]
    body_missing = [k for k in missing if k not in head_missing]
    if result.unexpected_keys or body_missing:
        raise ModelError(
            f"weights do not fit {type(model).__name__}: missing {body_missing[:5]} "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return not head_missing


def _no_weights(name: str) -> ModelError:
    return ModelError(
        f"{name} has no weights: pass ModelOptions.weights=<file> (state_dict .pt/.pth, .safetensors or "
        f"TorchScript), put the checkpoint in the local torch hub / Hugging Face cache, "
        f"or set random_weights=True (tests and benchmarks only)"
    )


def _torchvision_cached(arch: str) -> tuple[Path, Preprocess] | None:
    """A torchvision checkpoint already in the torch hub cache, with its own preprocessing."""
    weights_enum = torchvision.models.get_model_weights(arch)
    for weights in dict.fromkeys([weights_enum.DEFAULT, *weights_enum]):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        if path.is_file():
            tf = weights.transforms()
            return path, Preprocess(input_size=tf.crop_size[0], resize_size=tf.resize_size[0],
                                    mean=tuple(tf.mean), std=tuple(tf.std),
                                    interpolation=tf.interpolation.value)
    return None


def build_torchvision(arch: str, options: ModelOptions) -> BuiltBackbone:
    model = torchvision.models.get_model(arch, weights=None)
    preprocess = CLASSIC
    path: str | Path | None = options.weights
    if path is None and not options.random_weights:
        cached = _torchvision_cached(arch)
        if cached is None:
            raise _no_weights(arch)
        path, preprocess = cached
    head_loaded = path is not None and load_weights(model, read_state_dict(path), head_name="fc")
    head = model.fc if head_loaded or path is None else None  # random weights: a random head
    dim = model.fc.in_features
    model.fc = nn.Identity()  # the embedding is avgpool's output, flattened
    source = str(path) if path is not None else "random (random_weights=True)"
    spec = ModelSpec(name=arch, dim=dim, preprocess=preprocess, weights_source=source)
    return BuiltBackbone(backbone=model.eval(), spec=spec, head=head)


for _arch in TORCHVISION_RESNETS:
    register(_arch)(partial(build_torchvision, _arch))


def _timm_cached(cfg: dict[str, object]) -> Path | None:
    """timm's pretrained file if it is already in the Hugging Face or torch hub cache."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = cfg.get("hf_hub_id")
    if isinstance(hub_id, str):
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if isinstance(url, str) and url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def _timm_preprocess(cfg: dict[str, object]) -> Preprocess:
    size = int(cfg["input_size"][-1])  # type: ignore[index]
    crop_pct = float(cfg.get("crop_pct") or 0.875)  # type: ignore[arg-type]
    interpolation = cfg.get("interpolation")
    return Preprocess(
        input_size=size,
        resize_size=math.floor(size / crop_pct),  # timm's own rounding
        mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(cfg["std"]),  # type: ignore[arg-type]
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


@register_prefix("timm")
def build_timm(arch: str, options: ModelOptions) -> BuiltBackbone:
    if not timm.is_model(arch):
        raise ModelError(f"timm has no architecture {arch!r}")
    model: Any = timm.create_model(arch, pretrained=False)  # classifier API differs per architecture
    cfg = dict(model.pretrained_cfg)
    path: str | Path | None = options.weights
    if path is None and not options.random_weights:
        path = _timm_cached(cfg)
        if path is None:
            raise _no_weights(f"timm:{arch}")
    classifier = model.get_classifier()
    head_name = next(name for name, module in model.named_modules() if module is classifier)
    head_loaded = path is not None and load_weights(model, read_state_dict(path), head_name)
    head = classifier if isinstance(classifier, nn.Linear) and (head_loaded or path is None) else None
    model.reset_classifier(0)  # forward() is now forward_head(forward_features(x), pre_logits=True)
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    source = str(path) if path is not None else "random (random_weights=True)"
    spec = ModelSpec(name=f"timm:{arch}", dim=dim, preprocess=_timm_preprocess(cfg), weights_source=source)
    return BuiltBackbone(backbone=model.eval(), spec=spec, head=head)
