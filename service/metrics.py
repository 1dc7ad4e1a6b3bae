"""Every Prometheus metric of the service, defined once, in a registry owned by one app instance.

Latency against S is the service's central trade-off, so request latency carries a `samples`
label, bucketed to powers of two so its cardinality stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from service.core.errors import REJECT_REASONS, ServiceError

SAMPLES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# From 0.1 ms (a GPU batch) to a minute (S=128 on a busy CPU).
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0)
# ≈ ×1.5 steps from 50 ms up: S=8-32 latencies live between 0.1 and 10 s, and the read-back p50 is only as
# good as its bucket. A superset of the classic edges, so alert thresholds on them keep working.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0,
                    1.5, 2.5, 3.5, 5.0, 7.5, 10.0, 15.0, 25.0, 40.0, 60.0)
_SAMPLES_USED_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
_BATCH_CROPS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_BATCH_REQUESTS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


def samples_label(samples: int) -> str:
    """S → the smallest bucket holding it: 1, 2, 4, …, 64, or '128+'."""
    for bound in SAMPLES_BUCKETS:
        if samples <= bound:
            return str(bound)
    return "128+"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.request_duration = Histogram(
            "metta_request_duration_seconds", "Request latency, by endpoint and samples bucket (S).",
            ["endpoint", "samples"], buckets=_REQUEST_BUCKETS, registry=r)
        self.decode_duration = Histogram(
            "metta_decode_duration_seconds", "Time to decode and check one image.",
            buckets=_STAGE_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "metta_queue_wait_seconds", "Time from admission to a request's first crop entering a batch.",
            buckets=_STAGE_BUCKETS, registry=r)
        self.augment_duration = Histogram(
            "metta_augment_duration_seconds", "Time to render one batch's views.",
            buckets=_STAGE_BUCKETS, registry=r)
        self.forward_duration = Histogram(
            "metta_forward_duration_seconds", "Time of one batch's forward passes.",
            buckets=_STAGE_BUCKETS, registry=r)
        self.reduce_duration = Histogram(
            "metta_reduce_duration_seconds", "Time to merge one batch's embeddings into image statistics.",
            buckets=_STAGE_BUCKETS, registry=r)
        self.batch_crops = Histogram(
            "metta_batch_crops", "Crops per batch.", buckets=_BATCH_CROPS_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "metta_batch_requests", "Requests sharing one batch.", buckets=_BATCH_REQUESTS_BUCKETS, registry=r)
        self.queue_crops = Gauge(
            "metta_queue_crops", "Crops admitted and not yet computed (auto-S requests at the S they asked for).",
            registry=r)
        self.decode_backlog = Gauge(
            "metta_decode_backlog_seconds",
            "How long the decodes waiting and running would keep every decode worker busy, at the mean decode "
            "time measured lately (/readyz says 503 above the stall threshold, 5 s).", registry=r)
        self.queue_wait_estimate = Gauge(
            "metta_queue_wait_estimate_seconds",
            "The wait a new request would see: the crops queued now at the pace measured lately (0 when idle).",
            registry=r)
        # ∫ figure dt, kept exactly by the engine: increase(x[w]) / w is the figure's time-average over w.
        self.queue_crops_integral = CallbackCounter(
            "metta_queue_crops_seconds", "The time integral of metta_queue_crops (crop-seconds).", r)
        self.queue_wait_estimate_integral = CallbackCounter(
            "metta_queue_wait_estimate_seconds_seconds",
            "The time integral of metta_queue_wait_estimate_seconds (seconds × seconds).", r)
        self.forward_input_wait = Histogram(
            "metta_forward_input_wait_seconds",
            "Time the forward stage waited for its next rendered batch while that batch was being made "
            "(0 when rendering keeps ahead of the model).", buckets=_STAGE_BUCKETS, registry=r)
        self.max_queue_crops = Gauge("metta_max_queue_crops", "The queue's bound (max_queue_crops).", registry=r)
        self.max_batch_crops = Gauge("metta_max_batch_crops", "The batch size bound (max_batch_crops).",
                                     registry=r)
        self.inflight_requests = Gauge("metta_inflight_requests", "Requests admitted, not yet answered.",
                                       registry=r)
        self.requests = Counter("metta_requests", "Requests answered, by endpoint and status code.",
                                ["endpoint", "code"], registry=r)
        self.rejected = Counter("metta_rejected", "Requests refused or dropped, by reason.", ["reason"],
                                registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.images = Counter("metta_images", "Images embedded.", registry=r)
        self.samples_used = Histogram(
            "metta_samples_used", "S each request's images got (for samples='auto': the S the scheduler chose).",
            ["endpoint"], buckets=_SAMPLES_USED_BUCKETS, registry=r)
        self.samples_shrunk = Counter(
            "metta_samples_shrunk", "samples='auto' requests given fewer views than their samples_max (load).",
            ["endpoint"], registry=r)
        self.crops = Counter("metta_crops", "Crops (views) run through the model.", registry=r)
        self.ready = Gauge("metta_ready", "1 while /readyz says ready (model loaded and warmed up, worker alive, "
                           "not shutting down, decode workers not all stuck), else 0.", registry=r)
        self.model_info = Gauge("metta_model_info", "The loaded model (value is always 1).",
                                ["model", "fingerprint", "dim", "device", "dtype", "mode"], registry=r)
        self._cuda_device: str | None = None
        r.register(_CudaMemoryCollector(self))

    def count_refusal(self, error: ServiceError) -> None:
        """One refusal reply, counted under its class's reason by whoever sends it: the app's error handler, or
        a middleware or the HTTP protocol when they answer themselves. A request whose client left gets no
        reply: `client_gone` is counted by the app where it notices (`count_client_gone`)."""
        if error.reason is not None:
            self.rejected.labels(error.reason).inc()

    def watch_cuda(self, device: str) -> None:
        self._cuda_device = device

    def generate(self) -> bytes:
        return _generate_latest(self.registry)


class CallbackCounter:
    """A counter whose total its owner keeps and this reads at scrape time (`set_function`, as a Gauge's)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name  # exported as <name>_total
        self._documentation = documentation
        self._read: Callable[[], float] = lambda: 0.0
        registry.register(self)

    def set_function(self, read: Callable[[], float]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class _CudaMemoryCollector:
    """Device memory in use, read at scrape time (CUDA only)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self):  # type: ignore[no-untyped-def]
        device = self._metrics._cuda_device
        if device is None:
            return
        import torch

        family = GaugeMetricFamily("metta_cuda_memory_allocated_bytes", "CUDA memory held by tensors.",
                                   labels=["device"])
        family.add_metric([device], float(torch.cuda.memory_allocated(device)))
        yield family
