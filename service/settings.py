"""Service settings, read from `ONNX_EXPLAIN_*` environment variables."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.keys import check_api_keys, split_api_keys

if TYPE_CHECKING:  # onnxruntime loads with engines.runtime.session: not for every CLI command
    from engines.runtime.batcher import BatchPolicy
    from engines.runtime.session import RuntimeOptions


def cores() -> int:
    return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    # Inputs stay out of validation errors: one of them may hold API keys.
    model_config = SettingsConfigDict(
        env_prefix="ONNX_EXPLAIN_", extra="ignore", hide_input_in_errors=True
    )

    model_repository: Path = Field(
        default=Path("models"), description="Folder with one subfolder per model."
    )
    cache_dir: Path = Field(
        default=Path("cache"), description="Writable folder for prepared gradient graphs."
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` uses CUDA when onnxruntime offers it, else CPU."
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Threads per onnxruntime session; 0 = the machine's cores but one, divided "
        "by the number of workers (at least 1), so threads x workers <= cores.",
    )
    batch_intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Threads of the sessions that run long batch jobs: occlusion, smoothgrad, "
        "integrated_gradients, gradientshap, rise, lime, kernelshap, scorecam, ablationcam and "
        "the deletion/insertion curves; they share the model's weights with the others, and "
        "equal to `intra_op_threads` they run on the same sessions. 0 = the machine's cores "
        "divided by the number of workers, while short requests keep `intra_op_threads`. A "
        "batch takes these threads only while no other request's short run is in flight or "
        "ended in the last 50 ms; otherwise it runs on the short requests' sessions.",
    )
    inter_op_threads: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Threads onnxruntime runs independent branches on (1: one at a time).",
    )
    spin_wait: bool = Field(
        default=False,
        description="Let onnxruntime's pool threads spin between parallel sections. Off by "
        "default: under load the spinning takes cores from decoding, rendering and HTTP.",
    )
    max_in_flight: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Requests doing engine work at once per process; more get 503 at once.",
    )
    batch_window_ms: float | None = Field(
        default=None,
        ge=0.0,
        le=1000.0,
        description="How long a batch waits for more requests of the same model and graph, "
        "from the oldest one's arrival; unset = by provider: 0 on CPU (batches form from what "
        "queues while a run is busy), 5 on a GPU.",
    )
    max_batch: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Rows per batched run; 0 = by provider: 4 on CPU, where onnxruntime is "
        "fastest per image at small batches, 32 on a GPU.",
    )
    max_queue: int = Field(
        default=64, ge=1, le=100_000, description="Waiting requests per batch queue."
    )
    request_timeout_seconds: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Deadline of a request's engine work (lower per request with timeout_ms); "
        "past it the work is terminated and the caller gets 504.",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted."
    )
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="Largest encoded image accepted."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=64,
        description="Largest image accepted, in pixels, read from its header before decoding.",
    )
    min_image_side: int = Field(
        default=8, ge=1, le=1024, description="Smallest image side accepted, in pixels."
    )
    max_passes: int = Field(
        default=4096, ge=1, le=1_000_000, description="Forward passes one request may cost."
    )
    memory_budget_bytes: int = Field(
        default=0,
        ge=0,
        description="Memory for loaded models, their prepared graphs and the batches in flight; "
        "least recently used graphs and models are evicted to stay under it. 0 = 75% of the "
        "container's memory limit (cgroup), else 50% of the machine's RAM.",
    )
    max_graph_builds: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Gradient/activation graphs built at once; a request waits for a slot "
        "within its deadline, else 503 with Retry-After.",
    )
    warm_graphs: bool = Field(
        default=True,
        description="Build each model's default-layer Grad-CAM, saliency and guided backprop "
        "graphs in the background once it loads, so first requests do not wait for them.",
    )
    occlusion_memory_budget_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024 * 1024,
        description="Memory for occluded copies and their activations in flight at once; "
        "sets occlusion's batch size.",
    )
    occlusion_jobs: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Occlusion requests holding their copies at once per process; the others "
        "wait their turn (within their deadline), so memory stays near this many budgets.",
    )
    host: str = Field(default="127.0.0.1", description="Address `serve` listens on.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `serve` listens on.")
    workers: int = Field(
        default=1, ge=1, le=64, description="Server processes; each loads the models."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="`debug`, `info`, `warning` or `error`."
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="`json`: one JSON object a line, with the request id."
    )
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated keys accepted in `X-API-Key`; empty = no authentication. "
        "Placeholders and keys under 16 characters are refused at start-up.",
    )
    label_studio_url: str = Field(
        default="",
        max_length=512,
        description="The Label Studio the ML backend (/label-studio/{model}) fetches task images "
        "from, e.g. `http://label-studio:8080`; nothing else is fetched (data: URIs aside). Empty: "
        "data: URIs only.",
    )
    label_studio_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="Sent as `Authorization: Token <key>` when fetching task images.",
    )
    label_studio_method: str = Field(
        default="gradcam",
        max_length=64,
        description="The explanation method of the Label Studio backend, unless a project's "
        "`extra_params` names another.",
    )
    label_studio_brush_fraction: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="The share of the image a `brushlabels` region covers: the map's top "
        "fraction (a project's `extra_params` may set `brush_fraction`).",
    )
    label_studio_fetch_timeout_seconds: float = Field(
        default=10.0, gt=0.0, le=120.0, description="Timeout of one task image fetch."
    )
    shutdown_grace_seconds: int = Field(
        default=20,
        ge=1,
        le=3600,
        description="After SIGTERM (and the delay), how long in-flight requests may take.",
    )
    shutdown_delay_seconds: float = Field(
        default=0.0,
        ge=0.0,
        le=300.0,
        description="After SIGTERM, how long to keep serving with /readyz at 503 before the "
        "listener closes (for load balancers to stop routing here).",
    )

    @field_validator("api_keys")
    @classmethod
    def _usable_api_keys(cls, value: SecretStr) -> SecretStr:
        check_api_keys(split_api_keys(value.get_secret_value()))
        return value

    @property
    def api_key_list(self) -> list[str]:
        return split_api_keys(self.api_keys.get_secret_value())

    @property
    def threads_per_session(self) -> int:
        # One core is left to each process's Python side (event loop, decoding, rendering):
        # on 2 cores a served Grad-CAM ran as fast with one onnxruntime thread as with two,
        # since the threads otherwise fight the request handling for the same cores.
        return self.intra_op_threads or max(1, (cores() - 1) // self.workers)

    def batch_policy(self) -> "BatchPolicy":
        """How runs of one model are batched, for the service and `onnx-explain batch` alike."""
        from engines.runtime.batcher import BatchPolicy

        window = None if self.batch_window_ms is None else self.batch_window_ms / 1000
        return BatchPolicy(
            window_seconds=window, max_rows=self.max_batch, max_queued=self.max_queue
        )

    @property
    def batch_threads_per_session(self) -> int:
        # Batch jobs are few at once (occlusion_jobs) and long, so they may take every core
        # the process has: on an idle 2-core machine occlusion ran 1.75x faster with two
        # threads than with one (issue 17: 5.3 s against 9.3 s); with the cores shared by
        # other work, two threads gained little (benchmarks/occlusion.py prints both).
        return self.batch_intra_op_threads or max(1, cores() // self.workers)

    def runtime_options(self) -> "RuntimeOptions":
        """How sessions run, for the service and for `onnx-explain explain --local` alike."""
        from engines.runtime.session import RuntimeOptions

        return RuntimeOptions(
            providers=self.providers,
            intra_op_threads=self.threads_per_session,
            batch_intra_op_threads=self.batch_threads_per_session,
            inter_op_threads=self.inter_op_threads,
            spin_wait=self.spin_wait,
        )
