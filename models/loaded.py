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
# JPEGs decoded at the DCT-domain scale (1/2, 1/4, 1/8) their views allow (service.core.embedding's
# decode_reduction), or always at full size. Close (cosine >= 0.999 on 12 MP photos), not identical.
DECODE_SCALINGS = ("reduced", "full")
# Bumped when the same options decode to other pixels, so a dataset written before is not resumed as if its rows
# were comparable (2: a reduced decode is resampled along the full picture's geometry,
# service.core.render.resize_reduced, where sides that are not a multiple of its scale drifted before; and it
# keeps more source pixels per view, service.core.embedding's margins; sRGB ICC profiles are no longer applied,
# which lcms did by rounding a few colours by one level, none of the sample photos').
DECODE_REVISION = 2


def fingerprint(weights_sha: str, spec: ModelSpec, dtype: str, mode: str, *, device_type: str = "cpu",
                jpeg_decoder: str = "pillow", color: str = "icc-srgb", scaling: str = "reduced") -> str:
    """A short id, a pure function of everything that changes pixels or numerics: equal fingerprints mean
    comparable embeddings. Weights, preprocessing, dtype, engine, device type (kernels), the view renderer
    (follows the device type), the JPEG decoder, the colour handling, the decode scaling and its revision."""
    if jpeg_decoder not in JPEG_DECODERS:
        raise ModelError(f"unknown JPEG decoder {jpeg_decoder!r}; one of {', '.join(JPEG_DECODERS)}")
    if color not in COLOR_MODES:
        raise ModelError(f"unknown colour mode {color!r}; one of {', '.join(COLOR_MODES)}")
    if scaling not in DECODE_SCALINGS:
        raise ModelError(f"unknown decode scaling {scaling!r}; one of {', '.join(DECODE_SCALINGS)}")
    payload = json.dumps(
        {"weights": weights_sha, "preprocess": asdict(spec.preprocess), "dim": spec.dim,
         "dtype": dtype, "mode": mode, "device_type": device_type,
         "renderer": RENDERERS.get(device_type, CPU_RENDERER), "jpeg_decoder": jpeg_decoder, "color": color,
         "scaling": scaling, "decode_revision": DECODE_REVISION},
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
        self.decoding = {"jpeg_decoder": "pillow", "color": "icc-srgb", "scaling": "reduced"}  # fingerprint's defaults
        self._run = run
        mean = torch.tensor(spec.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._mean = mean.to(device)
        self._std = std.to(device)
        self._rows_by_width: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # see normalize_into

    def set_decoding(self, *, jpeg_decoder: str, color: str, scaling: str = "reduced") -> None:
        """The server's decoding choices change pixels too: the reported fingerprint names them (and
        `decoding` says what they are, for /v1/models).

        A model built without a weights digest (tests wrap one) stands in its given fingerprint for it.
        """
        weights = self.weights_sha or f"given:{self._given_fingerprint}"
        self.fingerprint = fingerprint(weights, self.spec, self.dtype, self.mode, device_type=self.device.type,
                                       jpeg_decoder=jpeg_decoder, color=color, scaling=scaling)
        self.decoding = {"jpeg_decoder": jpeg_decoder, "color": color, "scaling": scaling}

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

    def new_batch(self, rows: int, size: int) -> torch.Tensor:
        """An empty float32 (rows, 3, size, size) batch on the model's device, in the engine's input layout."""
        return torch.empty((rows, 3, size, size), dtype=torch.float32, device=self.device,
                           memory_format=self.input_format)

    def normalize_into(self, view: torch.Tensor, out: torch.Tensor) -> None:
        """One uint8 (3, H, W) view, normalised into `out` (a row of `new_batch`): `normalize`'s values.

        A view from the CPU renderer is pixel-interleaved, as a channels-last row is, so this is a straight
        pass while the view is still in cache; normalising a whole stacked batch into channels-last
        instead transposes it, at twice the cost of the resize itself.
        """
        height, width = int(view.shape[1]), int(view.shape[2])
        if view.stride(0) != 1 or out.stride(0) != 1 or out.device != view.device:
            out.copy_(view).sub_(self._mean[0]).div_(self._std[0])
            return
        # Both pixel-interleaved: each image row is W×3 values; the mean and std repeat along it. A (3,)
        # broadcast over that layout would not vectorise (3× slower).
        mean_row, std_row = self._interleaved_rows(width)
        rows = out.permute(1, 2, 0).view(height, width * 3)
        rows.copy_(view.permute(1, 2, 0).reshape(height, width * 3)).sub_(mean_row).div_(std_row)

    def _interleaved_rows(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows_by_width.get(width)
        if rows is None:
            mean, std = self._mean.view(3).repeat(width), self._std.view(3).repeat(width)
            rows = self._rows_by_width[width] = (mean, std)
        return rows

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
