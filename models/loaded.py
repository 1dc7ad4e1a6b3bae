"""A backbone ready to serve (`LoadedModel`) and the fingerprint that says which embeddings are comparable."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from models.spec import ModelError, ModelSpec


def weights_digest(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict, in order, names included."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


# Who makes the view pixels, by device type (service/core/render.py): uint8 antialiased resizes on the CPU,
# float roi_align on CUDA. Comparable, not identical, so they are told apart.
RENDERERS = {"cuda": "float-roi-align"}
CPU_RENDERER = "uint8-antialias"
JPEG_DECODERS = ("pillow", "nvjpeg")  # libjpeg-turbo through Pillow; torchvision's nvJPEG on CUDA
COLOR_MODES = ("icc-srgb", "none")  # embedded ICC profiles converted to sRGB at decode, or ignored


def fingerprint(weights_sha: str, spec: ModelSpec, dtype: str, mode: str, *, device_type: str = "cpu",
                jpeg_decoder: str = "pillow", color: str = "icc-srgb") -> str:
    """A short id, a pure function of everything that changes pixels or numerics: equal fingerprints mean
    comparable embeddings. Weights, preprocessing, dtype, engine, device type (kernels), the view renderer
    (follows the device type), the JPEG decoder and the colour handling at decode."""
    if jpeg_decoder not in JPEG_DECODERS:
        raise ModelError(f"unknown JPEG decoder {jpeg_decoder!r}; one of {', '.join(JPEG_DECODERS)}")
    if color not in COLOR_MODES:
        raise ModelError(f"unknown colour mode {color!r}; one of {', '.join(COLOR_MODES)}")
    payload = json.dumps(
        {"weights": weights_sha, "preprocess": asdict(spec.preprocess), "dim": spec.dim,
         "dtype": dtype, "mode": mode, "device_type": device_type,
         "renderer": RENDERERS.get(device_type, CPU_RENDERER), "jpeg_decoder": jpeg_decoder, "color": color},
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
        weights_sha: str = "",
        input_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.spec = spec
        # The layout the engine takes its input in (channels_last for the torch engines): `normalize` makes the
        # batch in it, so the forward does not repack a float batch (measured 3.4 ms per 32 crops).
        self.input_format = input_format
        self.device = device
        self.dtype = dtype
        self.mode = mode
        self.fingerprint = fingerprint
        self.head = head
        self.weights_sha = weights_sha  # `weights_digest` of the backbone: keys the shipped calibration
        self._given_fingerprint = fingerprint
        self._run = run
        mean = torch.tensor(spec.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._mean = mean.to(device)
        self._std = std.to(device)

    def set_decoding(self, *, jpeg_decoder: str, color: str) -> None:
        """The server's decoding choices change pixels too: the reported fingerprint names them.

        A model built without a weights digest (tests wrap one) stands in its given fingerprint for it.
        """
        weights = self.weights_sha or f"given:{self._given_fingerprint}"
        self.fingerprint = fingerprint(weights, self.spec, self.dtype, self.mode, device_type=self.device.type,
                                       jpeg_decoder=jpeg_decoder, color=color)

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
        # One pass to float in the engine's layout, then in place: half the time of `(x - mean) / std`
        normalized = torch.empty(views.shape, dtype=torch.float32, device=self.device, memory_format=self.input_format)
        return normalized.copy_(views).sub_(self._mean).div_(self._std)

    def normalize_float(self, views: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) pixels in [0, 255] (a device renderer's output) → normalised, in place."""
        if not views.is_floating_point() or views.ndim != 4 or views.shape[1] != 3:
            raise ModelError(f"expected a float (B, 3, H, W) batch, got {views.dtype} {tuple(views.shape)}")
        views = views.to(self.device, torch.float32).contiguous(memory_format=self.input_format)
        return views.sub_(self._mean).div_(self._std)

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, dim), float32 on the CPU, of a normalised batch (from `normalize`)."""
        with torch.inference_mode():
            return self._run(normalized).float().cpu()

    def embed_views(self, views: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, dim), float32 on the CPU, for a batch of same-size uint8 views."""
        return self.forward(self.normalize(views))

    def empty_cache(self) -> None:
        """Give cached device memory back (after an out-of-memory error)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
