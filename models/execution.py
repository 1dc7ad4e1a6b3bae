"""Execution engines: how a built backbone runs on its device (eager, TorchScript, OpenVINO).

Every engine takes a normalised float32 batch (B, 3, H, W) of any batch size and any square size
(the multiscale policy sends 224, 158 and 112 px batches) and returns (B, dim).

`auto` resolves to eager on CUDA and to OpenVINO on CPU, the fastest engine there that reproduces
eager (cosine > 0.99999 on real photos): for EfficientNet-Lite0, 2 threads, batch 4, 224 px, fp32
crops/s were eager 60, channels_last 107, TorchScript trace+freeze 254, OpenVINO 352 (docs/METTA.md),
and OpenVINO stayed 3-7x ahead of the torch engines in our own (heavily loaded) runs.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import nn

from models.loaded import LoadedModel, fingerprint, weights_digest
from models.spec import BuiltBackbone, ModelError, ModelOptions

MODES = ("auto", "eager", "torchscript", "openvino")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Run = Callable[[torch.Tensor], torch.Tensor]


def resolve_mode(mode: str, device: torch.device, *, eager_only: bool = False) -> str:
    if mode not in MODES:
        raise ModelError(f"unknown execution mode {mode!r}; choose one of {', '.join(MODES)}")
    if eager_only:
        if mode not in ("auto", "eager"):
            raise ModelError(f"this backbone runs eagerly only (a {mode} graph would drop its work); use mode eager")
        return "eager"
    if mode == "auto":
        return "eager" if device.type == "cuda" else "openvino"
    if mode == "openvino" and device.type != "cpu":
        raise ModelError("the openvino engine runs on the CPU only")
    return mode


def _check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    allowed = ("float32", "float16", "bfloat16") if device.type == "cuda" else ("float32", "bfloat16")
    if dtype not in allowed:
        raise ModelError(f"dtype {dtype!r} is not supported on {device.type}; choose one of {', '.join(allowed)}")
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        # Emulated bf16 measured 3 crops/s eager on an AVX2-only CPU, 30x slower than float32.
        raise ModelError("dtype bfloat16 needs a CPU with native bf16 (AVX-512 BF16 or AMX), which this one "
                         "lacks; use float32")
    return DTYPES[dtype]


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AVX-512 BF16 or AMX-BF16 among the CPU's flags (Linux); elsewhere assume yes and let it be measured."""
    try:
        with open(cpuinfo) as file:
            flags = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return True
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def _trace(backbone: nn.Module, example: torch.Tensor, *, freeze: bool) -> torch.jit.ScriptModule:
    """torch.jit.trace (+ freeze), silencing its upstream deprecation notice: trace + freeze is still
    the fastest TorchScript path on CPU, and OpenVINO converts a traced module 3x faster than it
    traces by itself. The traced graph keeps shapes symbolic (timm's TF "same" padding included),
    so one trace serves every batch and image size; the tests check this against eager."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        # check_trace re-runs the model to compare outputs: it doubles start-up, the tests cover it
        traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
            backbone, example, check_trace=False
        )
        return torch.jit.freeze(traced) if freeze else traced


def _eager(backbone: nn.Module, dtype: torch.dtype, example: torch.Tensor, options: ModelOptions) -> Run:
    backbone.to(dtype).to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = backbone(x.to(dtype=dtype, memory_format=torch.channels_last))
        return out

    return run


def _torchscript(backbone: nn.Module, dtype: torch.dtype, example: torch.Tensor, options: ModelOptions) -> Run:
    if dtype != torch.float32:
        # freeze folds BatchNorm into the convolutions in low precision: bf16 cosine to fp32 fell to 0.995
        raise ModelError(f"torchscript runs float32 only, not {dtype}; use mode eager or openvino")
    backbone.to(memory_format=torch.channels_last)
    frozen = _trace(backbone, example.to(memory_format=torch.channels_last), freeze=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = frozen(x.contiguous(memory_format=torch.channels_last))
        return out

    return run


def _openvino(backbone: nn.Module, dtype: torch.dtype, example: torch.Tensor, options: ModelOptions) -> Run:
    import openvino as ov

    # One model with dynamic batch and spatial size: measured as fast as a model compiled per shape.
    traced = _trace(backbone, example, freeze=False)
    ov_model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, 3, -1, -1])])
    config: dict[str, object] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: callers from several threads take turns

    def run(x: torch.Tensor) -> torch.Tensor:
        with lock:
            request.infer({0: x.contiguous().numpy()})
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


ENGINES = {"eager": _eager, "torchscript": _torchscript, "openvino": _openvino}


def compile_backbone(built: BuiltBackbone, options: ModelOptions) -> LoadedModel:
    device = torch.device(options.device)
    mode = resolve_mode(options.mode, device, eager_only=built.eager_only)
    dtype = _check_dtype(options.dtype, device)
    if options.threads:
        torch.set_num_threads(options.threads)
    digest = weights_digest(built.backbone)  # before any dtype change: the fingerprint names the dtype
    size = built.spec.preprocess.input_size
    example = torch.zeros(1, 3, size, size, device=device)
    run = ENGINES[mode](built.backbone.eval().to(device), dtype, example, options)
    if built.head is not None:
        built.head.requires_grad_(False)  # evaluation only: usable on inference-mode embeddings
    return LoadedModel(
        built.spec,
        run,
        device=device,
        dtype=options.dtype,
        mode=mode,
        fingerprint=fingerprint(digest, built.spec, options.dtype, mode, device_type=device.type),
        head=built.head,
        weights_sha=digest,
        input_format=torch.contiguous_format if mode == "openvino" else torch.channels_last,
    )
