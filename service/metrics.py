"""Prometheus metrics, one registry per app (per process: workers are not aggregated).

`create_app` makes one `ServiceMetrics` and keeps it on `app.state.metrics`; `GET /metrics`
exposes it. The request middleware counts requests; routes time their stages with
`service.observability.observe_stages`; the batcher reports through `observe_batch` and
`set_queue_depth` (or `on_batch`, which has `ModelRepository`'s hook signature).
"""

from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engines.runtime.memory import MemoryBudget, resident_bytes

# Seconds: from a cached decode (ms) to an occlusion over a big model (tens of seconds).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Seconds: a small model's activation graph (tens of ms) to a big model's gradients (a minute).
BUILD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class BudgetCollector(Collector):
    """The memory budget's state, read when /metrics is scraped."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget

    def collect(self) -> Iterator[Metric]:
        usage = self.budget.usage()
        yield GaugeMetricFamily(
            "onnx_explain_memory_budget_bytes",
            "The memory budget for models, prepared graphs and batches in flight.",
            value=usage.limit_bytes,
        )
        yield GaugeMetricFamily(
            "onnx_explain_memory_resident_bytes",
            "The process's resident set size.",
            value=resident_bytes(),
        )
        cached = GaugeMetricFamily(
            "onnx_explain_cache_bytes",
            "Estimated bytes resident under the budget, by kind (model, gradient, activations, "
            "occlusion, maximize).",
            labels=["kind"],
        )
        for kind, size in sorted(usage.by_kind.items()):
            cached.add_metric([kind], size)
        yield cached
        yield GaugeMetricFamily(
            "onnx_explain_memory_reserved_bytes",
            "Bytes held by work in flight (batches, model loads).",
            value=usage.reserved_bytes,
        )
        evicted = CounterMetricFamily(
            "onnx_explain_evictions",
            "Entries evicted from the memory budget, by kind.",
            labels=["kind"],
        )
        for kind, count in sorted(usage.evictions.items()):
            evicted.add_metric([kind], count)
        yield evicted
        yield GaugeMetricFamily(
            "onnx_explain_graph_builds_in_flight",
            "Graphs being built now.",
            value=usage.builds_in_flight,
        )


class ServiceMetrics:
    """The service's metrics in a registry of their own, so several apps can live in one
    process (tests) without clashing in prometheus_client's global registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "onnx_explain_requests",
            "HTTP requests answered, by model, method (predict, info, an explain method, ...) "
            "and status code.",
            ("model", "method", "status"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "onnx_explain_request_duration_seconds",
            "Time from the request's arrival to the end of its answer.",
            ("model", "method"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "onnx_explain_stage_duration_seconds",
            "Time spent in one stage of a request: decode, inference or render.",
            ("stage", "model"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "onnx_explain_requests_in_flight",
            "HTTP requests being answered now.",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "onnx_explain_queue_depth",
            "Requests waiting in a model's batch queue.",
            ("model",),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "onnx_explain_batch_size",
            "Rows per cross-request batch run.",
            ("model",),
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

        self.build_seconds = Histogram(
            "onnx_explain_graph_build_duration_seconds",
            "Time to build and load one prepared graph, by kind.",
            ("kind",),
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )

    def watch_budget(self, budget: MemoryBudget) -> None:
        """Expose `budget` and time its builds (one budget per app)."""
        self.registry.register(BudgetCollector(budget))
        budget.on_build = self.observe_build

    def observe_build(self, kind: str, seconds: float) -> None:
        self.build_seconds.labels(kind=kind).observe(max(0.0, seconds))

    def observe_stage(self, stage: str, model: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage, model=model).observe(max(0.0, seconds))

    def set_queue_depth(self, model: str, n: int) -> None:
        self.queue_depth.labels(model=model).set(n)

    def observe_batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model=model).observe(size)

    def on_batch(self, model: str, rows: int, queued: int) -> None:
        """`ModelRepository(on_batch=...)`'s hook: one batch of `rows` ran, `queued` wait."""
        self.observe_batch(model, rows)
        self.set_queue_depth(model, queued)

    def observe_request(self, model: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(model=model, method=method, status=str(status)).inc()
        self.request_seconds.labels(model=model, method=method).observe(max(0.0, seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_of(app: FastAPI) -> ServiceMetrics | None:
    found = getattr(app.state, "metrics", None)
    return found if isinstance(found, ServiceMetrics) else None


router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    found = metrics_of(request.app)
    body = found.render() if found is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
