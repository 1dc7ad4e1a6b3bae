"""The one typed, frozen settings object. Environment (prefix METTA_) and CLI flags both map onto it."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.options import ONE_VIEW_POLICIES, PolicyName

if TYPE_CHECKING:
    from models import ModelOptions
    from service.engine.scheduler import BatchingConfig

# (max_batch_crops, chunk_crops) per device type. CPU: the batching sweep in docs/benchmarks.md (2 cores,
# OpenVINO; one S=32 request is one forward). CUDA: a forward of this backbone needs hundreds of crops
# to fill the device (bench/gpu.sh sweeps it where a GPU is lent; not yet measured on one).
BATCHING_DEFAULTS = {"cpu": (32, 16), "cuda": (256, 64)}


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, capped by a cgroup v2/v1 CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()  # cgroup v2: "quota period"
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METTA_", frozen=True, extra="forbid")

    # Network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Model and how it runs
    model: str = "efficientnet_lite0"
    weights: str | None = Field(None, description="local weights file for models without packaged weights")
    random_weights: bool = Field(False, description="allow random weights (tests and speed benchmarks only)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mode: Literal["auto", "eager", "torchscript", "openvino"] = Field("auto", description="execution engine")
    threads: int = Field(default_factory=available_cpus, ge=1, description="intra-op threads (CPU)")
    decode_workers: int = Field(default_factory=available_cpus, ge=1, description="image decode threads")
    decode_time_budget_s: float = Field(
        10.0, ge=0, description="each decode but a baseline JPEG's runs in a child process killed past this "
                                "many seconds (400); 0: every decode in its thread, without a budget")
    render_workers: int = Field(default_factory=available_cpus, ge=1,
                                description="threads rendering one batch's views, while the model runs the last")
    device_jpeg_decode: bool = Field(True, description="on CUDA, decode JPEGs on the GPU (nvJPEG via torchvision)")
    icc_to_srgb: bool = Field(True, description="convert embedded ICC colour profiles to sRGB at decode")
    reduced_decode: bool = Field(True, description="decode JPEGs at the reduced scale (1/2, 1/4, 1/8) their views "
                                                   "allow, in the DCT domain; off: always at full size")

    # Batching (counted in crops: one request brings images × samples of them). Unset: per device type
    # (`BATCHING_DEFAULTS`): a CPU forward is at full speed by 32 crops, a GPU forward wants hundreds.
    max_batch_crops: int | None = Field(None, ge=1, description="crops per forward batch (default: per device)")
    chunk_crops: int | None = Field(
        None, ge=1, description="crops one request may put in a batch per turn, for fairness (default: per device)")
    max_wait_ms: float = Field(0.0, ge=0, description="wait for more work only while others are queued")
    max_queue_crops: int = Field(2048, ge=1)
    auto_wait_batches: float = Field(
        8.0, gt=0, description="samples='auto': the wait target in full batches at the measured pace, shared by the "
        "requests queued: with n queued (or refused lately), a new one gets S <= target crops / (n + 1)")
    max_request_crops: int = Field(1024, ge=1)

    # Request limits
    max_samples: int = Field(128, ge=1)
    max_images: int = Field(64, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_image_side: int = Field(12_000, ge=1)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0, description="time allowed to receive a whole request body")
    header_timeout_s: float = Field(10.0, gt=0, description="time allowed to receive a request's headers")
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line and headers, in bytes (else 431)")
    max_headers: int = Field(100, ge=1, description="headers per request (else 431)")
    write_timeout_s: float = Field(60.0, gt=0, description="a client that takes no byte of its reply for this long is "
                                   "dropped: the connection is reset and its unsent bytes freed")
    linger_s: float = Field(30.0, ge=0, description="after a reply sent before its request's body arrived, read "
                            "and discard the rest at most this long (so the client reads the reply, not a reset)")
    linger_bytes: int | None = Field(None, ge=0, description="... and at most this many bytes (default: "
                                     "max_body_bytes + 1 MiB; at least max_body_bytes)")
    max_connections: int = Field(4096, ge=1, description="open connections (lingering ones included); past it "
                                 "a new connection gets 503 at once")
    max_json_elements: int = Field(10_000, ge=1, description="values in a JSON body, counted before parsing")
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="request bodies held at once, server-wide (else 429)")
    max_queue_pixels: int = Field(
        256_000_000, ge=1, description="decoded pixels held at once, server-wide (else 429): each image's header "
        "size while it decodes, then its working copy's until its request settles (3 bytes each)")
    # The drain outlasts the longest admitted request (request_timeout_s), or SIGTERM could cut one off.
    shutdown_grace_s: float = Field(65.0, ge=0, description="SIGTERM: time to finish in-flight work")
    shutdown_delay_s: float = Field(0.0, ge=0, description="SIGTERM: keep accepting this long with /readyz 503 "
                                    "first (a load balancer's health check takes the replica out)")

    # Defaults for requests that do not say, per task (docs/quality.md; figures in models/policy_quality.json).
    # /v1/embeddings, for search and matching: multi-resolution S=3 gave the best near-duplicate recall@1 for
    # 1.75x the pixels of one view. /v1/classify: crop_flip S=32, chosen on one half of the sample photos and
    # reported on the other (python -m evaluation.heldout): top-1 within the noise of the central crop's, a lower NLL
    # (docs/quality.md §6); the head on a multiscale mean loses 11 points.
    default_samples: int = Field(3, ge=1)
    default_policy: PolicyName = "multiscale"
    classify_samples: int = Field(32, ge=1, description="/v1/classify's S when a request does not say")
    classify_policy: PolicyName = Field("crop_flip", description="/v1/classify's policy when a request does not say")

    # Auth: keys come from the environment (METTA_API_KEYS, comma-separated) or a file, one per line.
    api_keys: SecretStr | None = Field(None, description="env only, never a CLI flag")
    api_keys_file: Path | None = None

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"the API keys file {value} does not exist")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_samples > self.max_samples:
            raise ValueError("default_samples must not exceed max_samples")
        if self.default_policy in ONE_VIEW_POLICIES and self.default_samples != 1:
            raise ValueError(f"the {self.default_policy} policy makes one view: default_samples must be 1 with it")
        if self.classify_samples > self.max_samples:
            raise ValueError("classify_samples must not exceed max_samples")
        if self.classify_policy in ONE_VIEW_POLICIES and self.classify_samples != 1:
            raise ValueError(f"the {self.classify_policy} policy makes one view: classify_samples must be 1 with it")
        if self.linger_bytes is not None and self.linger_bytes < self.max_body_bytes:
            raise ValueError("linger_bytes must be at least max_body_bytes (a refused client may send a whole body)")
        if self.max_request_crops > self.max_queue_crops:
            raise ValueError("max_request_crops must not exceed max_queue_crops (such a request could never run)")
        return self

    def lingering_bytes(self) -> int:
        """How much of a refused request's body is read and discarded at most (`linger_bytes`, or its default)."""
        return self.linger_bytes if self.linger_bytes is not None else self.max_body_bytes + 2**20

    def batching(self, device_type: str) -> BatchingConfig:
        """The batching bounds for a model on `device_type`: the settings where given, else its defaults."""
        from service.engine.scheduler import BatchingConfig

        default_batch, default_chunk = BATCHING_DEFAULTS.get(device_type, BATCHING_DEFAULTS["cpu"])
        max_batch = self.max_batch_crops or default_batch
        chunk = self.chunk_crops or min(default_chunk, max_batch)
        return BatchingConfig(max_batch, chunk, self.max_wait_ms, self.max_queue_crops, self.auto_wait_batches)

    def model_options(self) -> ModelOptions:
        """What `models.create_model` needs from these settings."""
        from models import ModelOptions

        return ModelOptions(device=self.resolved_device(), dtype=self.dtype, mode=self.mode, weights=self.weights,
                            random_weights=self.random_weights, threads=self.threads)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_api_keys(self) -> list[str]:
        """Every configured key (env and file together); empty means auth is off."""
        keys: list[str] = []
        if self.api_keys is not None:
            keys += [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return keys
