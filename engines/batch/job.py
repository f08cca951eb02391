"""One job: every image of a list explained with one loaded model, its maps written as files
and its line appended to the manifest.

Images are explained on a few worker threads at once, their decoding, preprocessing and
rendering alongside each other's runs. The model is loaded with a batch policy, so on a GPU the
single-image forward and gradient runs of the threads in flight join in one onnxruntime run (the
model's own cross-request batcher, engines.runtime.batcher), for every method; on CPU, where
that costs more than it saves, each run stays one image unless the policy says otherwise.
"""

import dataclasses
import hashlib
import io
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from engines.batch.inputs import ImageItem
from engines.batch.manifest import MANIFEST_FILE, Manifest, check_job, read_manifest, record_job
from engines.errors import EngineError, InvalidParameters, UnsupportedModel
from engines.graphs.prepared import write_file_atomically
from engines.imaging.decode import ImageLimits, decode_image, fit_to_input, preprocess
from engines.imaging.render import Encoded, render_maps
from engines.methods.metrics import MetricKind, faithfulness
from engines.methods.pipeline import Explainer, WorkLimits
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import MODEL_FILE, LoadedModel, file_sha256
from engines.models.support import find_support
from engines.runtime.batcher import BatchPolicy
from engines.runtime.memory import MemoryBudget
from engines.runtime.session import RuntimeOptions, choose_providers
from schemas.explain import OutputOptions
from schemas.heatmap import HeatmapFormat

MAPS_FOLDER = "maps"
FILE_SUFFIXES: dict[HeatmapFormat, str] = {
    "png": ".png",
    "png16": ".png16.png",
    "colormap": ".colormap.png",
    "overlay": ".overlay.png",
    "array": ".npy",
}
"""The formats a job writes, each as a file of its own: PNGs and NumPy arrays."""
FLOAT_DTYPES = {"float32": "<f4", "float16": "<f2"}
UNREADABLE = "unreadable_image"

ONE_ROW_RUNS_ON = ("CPUExecutionProvider",)
"""Where the batch policy, left to the provider, runs one image a run: on CPU a gradient run of
several images cost more per image than as many runs of one (`python -m benchmarks.batch`), so
the images in flight only overlap their decoding and rendering with each other's runs."""

Progress = Callable[[int, int], None]
"""Called with (images done, images in the job) after each manifest line."""


@dataclass(frozen=True)
class BatchSpec:
    """What a job does, complete and picklable: a Ray actor builds its worker from it."""

    model_name: str
    model_folder: Path
    method: str
    params: BaseModel
    """Already validated by the method's params model."""
    output_dir: Path
    output: OutputOptions = field(default_factory=OutputOptions)
    target: int | str | None = None
    """One class for every image (index or label); None: each image's top prediction."""
    metrics: tuple[MetricKind, ...] = ()
    """Faithfulness scores of each map (engines.methods.metrics): deletion, insertion."""
    metric_steps: int = 32
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    cache_dir: Path | None = None
    batch_policy: BatchPolicy = field(
        default_factory=lambda: BatchPolicy(window_seconds=None, max_rows=0)
    )
    """By provider unless set (max_rows 0): one image a run on CPU, batches of the images in
    flight gathered on a GPU."""
    images_in_flight: int = 0
    """Images explained at once, on as many threads; 0: by provider, as many as the service
    batches (4 on CPU, 32 on a GPU)."""
    memory_budget_bytes: int | None = None
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    work_limits: WorkLimits = field(default_factory=WorkLimits)

    def settings(self) -> dict[str, Any]:
        """What `job.json` records: a rerun in the same folder must make maps the same way."""
        return {
            "model": self.model_name,
            "model_sha256": file_sha256(self.model_folder / MODEL_FILE),
            "method": self.method,
            "params": self.params.model_dump(mode="json"),
            "target": self.target,
            "output": self.output.model_dump(mode="json"),
            "metrics": list(self.metrics),
            "metric_steps": self.metric_steps,
        }


def check_spec(spec: BatchSpec) -> None:
    """Refuse what no image could succeed with, before anything is loaded or written."""
    if spec.method not in EXPLAINERS:
        raise InvalidParameters(f"unknown method {spec.method!r}")
    if spec.metric_steps < 1:
        raise InvalidParameters("a faithfulness curve needs at least one step")
    unwritable = [fmt for fmt in spec.output.formats if fmt not in FILE_SUFFIXES]
    if unwritable:
        raise InvalidParameters(
            f"format {', '.join(unwritable)} is not written as files: use "
            f"{', '.join(FILE_SUFFIXES)}"
        )


def map_stem(key: str) -> str:
    """A file name for an image's maps: readable, and distinct for distinct keys."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key).stem)[:80] or "image"
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values)
    return buffer.getvalue()


def error_line(key: str, code: str, message: str) -> dict[str, Any]:
    return {"image": key, "error": {"code": code, "message": message}}


class BatchWorker:
    """One loaded model and the job's method; `explain` makes one image's files and line."""

    def __init__(self, spec: BatchSpec) -> None:
        check_spec(spec)
        self.spec = spec
        provider = choose_providers(spec.runtime.providers)[0]
        by_provider = BatchPolicy(max_rows=0).for_provider(provider).max_rows
        policy = spec.batch_policy
        if policy.max_rows == 0 and provider in ONE_ROW_RUNS_ON:
            policy = dataclasses.replace(policy, max_rows=1)
        budget = MemoryBudget(spec.memory_budget_bytes)
        self.model = LoadedModel(
            spec.model_name, spec.model_folder, spec.runtime, spec.cache_dir, policy, budget=budget
        )
        support = next(s for s in find_support(self.model) if s.method == spec.method)
        if not support.supported:
            raise UnsupportedModel(f"{spec.method} does not apply to this model: {support.reason}")
        self.explainer: Explainer = EXPLAINERS[spec.method]
        self.targets = None if spec.target is None else [self.model.resolve_target(spec.target)]
        self.maps_dir = spec.output_dir / MAPS_FOLDER
        self.images_in_flight = spec.images_in_flight or by_provider
        """Threads explaining images at once."""

    def explain(self, item: ImageItem) -> dict[str, Any]:
        """The manifest line of one image, after its files are written; an image that cannot
        be read or explained gets a line with its error instead."""
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            return error_line(item.key, UNREADABLE, f"cannot read {item.path}: {exc.strerror}")
        try:
            return self._explain(item.key, data)
        except EngineError as exc:
            return error_line(item.key, exc.code, exc.message)

    def _explain(self, key: str, data: bytes) -> dict[str, Any]:
        spec, model = self.spec, self.model
        image = decode_image(data, spec.image_limits)
        tensor = preprocess([image], model.config.input)
        explained = self.explainer.explain(
            model, tensor, self.targets, 1, spec.params, spec.work_limits
        )
        target_map = explained.maps[0]
        (encoded,) = render_maps([target_map.heatmap], image, model.config.input, spec.output)
        metrics = {}
        if spec.metrics:
            pixels = fit_to_input(image, model.config.input)
            curves = faithfulness(
                model,
                pixels,
                target_map.heatmap,
                target_map.target,
                spec.metrics,
                spec.metric_steps,
                spec.work_limits,
            )
            metrics = {f"{kind}_auc": curve.auc for kind, curve in curves.items()}
        files = self._write(map_stem(key), encoded)
        top = model.top_predictions(explained.probabilities, 1)[0]
        return {
            "image": key,
            "prediction": {"index": top.index, "label": top.label, "score": top.score},
            "target": target_map.target,
            "files": files,
            "metrics": metrics,
        }

    def _write(self, stem: str, encoded: list[Encoded]) -> dict[str, str]:
        """Each format's file, atomically; their paths relative to the output folder."""
        files: dict[str, str] = {}
        for one in encoded:
            assert one.data is not None
            data = one.data
            if one.format == "array":
                dtype = FLOAT_DTYPES[self.spec.output.dtype]
                data = npy_bytes(np.frombuffer(data, dtype=dtype).reshape(one.shape))
            path = self.maps_dir / f"{stem}{FILE_SUFFIXES[one.format]}"
            write_file_atomically(self.maps_dir, path, data)
            files[one.format] = path.relative_to(self.spec.output_dir).as_posix()
        return files

    def explain_all(self, items: Iterable[ImageItem]) -> Iterator[dict[str, Any]]:
        """The lines of `items`, in their order, `images_in_flight` of them at once."""
        in_flight: deque[Future[dict[str, Any]]] = deque()
        with ThreadPoolExecutor(self.images_in_flight, thread_name_prefix="batch") as pool:
            for item in items:
                in_flight.append(pool.submit(self.explain, item))
                if len(in_flight) > self.images_in_flight:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()


@dataclass(frozen=True)
class JobSummary:
    total: int
    """Images the input names."""
    skipped: int
    """Already in the manifest from an earlier run."""
    explained: int
    failed: int
    seconds: float


Start = Callable[[list[ImageItem]], Iterator[dict[str, Any]]]
"""Where a job's work runs: given the images to explain, it loads what it needs (and refuses
what cannot work) at once, then yields their manifest lines in any order."""


def run_job(
    spec: BatchSpec,
    items: list[ImageItem],
    progress: Progress | None = None,
    start: Start | None = None,
) -> JobSummary:
    """Explain each image of `items` the manifest in `spec.output_dir` lacks; by default on
    worker threads of this process, else as `start` runs them (engines.batch.on_ray).

    Nothing is written before the work has started: a refused job leaves no trace."""
    started = time.perf_counter()
    check_spec(spec)
    settings = spec.settings()
    check_job(spec.output_dir, settings)
    done = {line["image"] for line in read_manifest(spec.output_dir / MANIFEST_FILE)}
    todo = [item for item in items if item.key not in done]
    explained = failed = 0
    if todo:
        lines = start(todo) if start is not None else BatchWorker(spec).explain_all(todo)
        record_job(spec.output_dir, settings)
        with Manifest(spec.output_dir) as manifest:
            for line in lines:
                manifest.append(line)
                failed += "error" in line
                explained += "error" not in line
                if progress is not None:
                    progress(explained + failed, len(todo))
    skipped = len(items) - len(todo)
    return JobSummary(len(items), skipped, explained, failed, time.perf_counter() - started)
