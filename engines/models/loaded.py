"""A loaded model: its session, config, labels and layer list, with `forward` and `predict`."""

import hashlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from pydantic import ValidationError

from engines.errors import EngineError, InferenceFailed, InvalidModel, InvalidParameters
from engines.graphs.incremental import CutPlan, plan_cut, split_model
from engines.graphs.normalize import BatchMode, Normalized, fixed_batch_of_one, normalize
from engines.graphs.prepared import GradientGraphs
from engines.graphs.shapes import with_shapes
from engines.graphs.sizes import activation_bytes
from engines.graphs.suffix import SuffixReads, build_suffix_model
from engines.imaging.decode import preprocess
from engines.models.layers import LayerInfo, default_layer, spatial_layers
from engines.runtime.batcher import BatchPolicy, MicroBatcher
from engines.runtime.memory import MemoryBudget
from engines.runtime.session import ModelSession, RuntimeOptions
from engines.runtime.shared import ModelSessions, SharedWeights, build_session
from schemas.model_config import ModelConfig, channel_axis

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
MAX_PLANS = 16
"""Incremental occlusion plans kept per model (one per window size and grid)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: a confident class's probability is 1 - 1e-9 and more, which float32 rounds
    to 1, so every drop in it (occlusion, deletion curves, RISE) would read 0."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


def read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    try:
        return ModelConfig.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise InvalidModel(f"{CONFIG_FILE} is missing") from exc
    except ValidationError as exc:
        raise InvalidModel(f"{CONFIG_FILE} is invalid: {exc.error_count()} error(s)") from exc


def read_labels(folder: Path, config: ModelConfig) -> list[str]:
    if config.labels_file is None:
        return []
    path = folder / config.labels_file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"labels file {config.labels_file} cannot be read") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _first_input(model: onnx.ModelProto) -> str:
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not names:
        raise InvalidModel("the model has no input")
    return str(names[0])


def _first_output(model: onnx.ModelProto) -> str:
    if not model.graph.output:
        raise InvalidModel("the model has no output")
    return str(model.graph.output[0].name)


def _shown_dims(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    shown = [str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
    return f"[{', '.join(shown)}]"


def _check_nothing_else_to_feed(model: onnx.ModelProto, name: str) -> None:
    """The service feeds the image and nothing else: an input without an initializer to fall
    back on would fail every run."""
    initializers = {i.name for i in model.graph.initializer}
    others = [i for i in model.graph.input if i.name != name and i.name not in initializers]
    if not others:
        return
    shown = ", ".join(f"{i.name!r} {_shown_dims(i)}" for i in others[:4])
    raise InvalidModel(
        f"the model has {len(others)} input(s) besides the image {name!r} that nothing feeds: "
        f"{shown}{', ...' if len(others) > 4 else ''}. Only the image is fed; constants must be "
        "initializers (Keras 3's export on the TensorFlow backend leaves a Normalization "
        "layer's mean and variance as inputs: export with tf2onnx.convert.from_keras or the "
        "torch backend)"
    )


def _check_input_against_config(model: onnx.ModelProto, name: str, config: ModelConfig) -> None:
    """The model input's fixed dims must be the ones config.json feeds it."""
    spec = config.input
    declared = next((i for i in model.graph.input if i.name == name), None)
    if declared is None:
        raise InvalidModel(f"config names input {name!r}, the model has none")
    dims = declared.type.tensor_type.shape.dim
    if not dims:
        return
    if len(dims) != 4:
        raise InvalidModel(f"the model input {name!r} has {len(dims)} dims, not 4 (an image batch)")
    expected = spec.image_dims
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if any(f is not None and f != e for f, e in zip(fixed, expected, strict=True)):
        shown = "x".join(str(f) if f is not None else "?" for f in fixed)
        wanted = "x".join(str(e) for e in expected)
        raise InvalidModel(
            f"the model input {name!r} is fixed at {shown} per image, but config.json "
            f"({spec.layout}, {spec.height}x{spec.width}) feeds it {wanted}"
        )


def _batch_rewrite_holds(
    rewritten: onnx.ModelProto, original_path: Path, input_name: str, output_name: str
) -> bool:
    """Whether the rewritten model's batch of 2 equals two runs of the original, batch 1."""
    options = RuntimeOptions(providers="cpu", intra_op_threads=1)
    try:
        original = ModelSession(original_path, options)
        free = ModelSession(rewritten.SerializeToString(), options)
        declared = next(i for i in rewritten.graph.input if i.name == input_name)
        dims = [d.dim_value for d in declared.type.tensor_type.shape.dim[1:]]
        if not all(dims):
            return False
        rows = np.random.default_rng(0).standard_normal((2, *dims)).astype(np.float32)
        (together,) = free.run({input_name: rows}, [output_name])
        apart = [original.run({input_name: rows[i : i + 1]}, [output_name])[0] for i in range(2)]
    except (InvalidModel, InferenceFailed):
        return False
    expected = np.concatenate(apart)
    if together.shape != expected.shape:
        return False
    scale = max(float(np.abs(expected).max()), 1e-6)
    return bool(np.abs(together - expected).max() <= 1e-4 * scale)


class LoadedModel:
    def __init__(
        self,
        name: str,
        folder: Path,
        options: RuntimeOptions,
        cache_dir: Path | None = None,
        batch_policy: BatchPolicy | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        """`batch_policy` turns on cross-request batching of forward and gradient runs;
        `on_batch(rows, queued)` hears about every batch (for metrics); `budget` holds the
        model's prepared sessions (a budget of its own by default)."""
        self.name = name
        self.config = read_config(folder)
        self.labels = read_labels(folder, self.config)
        model_path = folder / MODEL_FILE
        self.model_path = model_path
        self.options = options
        self.budget = budget if budget is not None else MemoryBudget()
        self.weights = SharedWeights()
        self.sha256 = file_sha256(model_path)
        try:
            original = onnx.load(str(model_path))
        except Exception as exc:  # protobuf raises DecodeError and friends
            raise InvalidModel(f"{MODEL_FILE} is not a valid ONNX file") from exc
        self.input_name = self.config.input.name or _first_input(original)
        self.output_name = self.config.output_name or _first_output(original)
        _check_input_against_config(original, self.input_name, self.config)
        _check_nothing_else_to_feed(original, self.input_name)
        try:
            normalized = self._normalized(original, model_path)
            graph_bytes = normalized.model.SerializeToString()
            forward = build_session(graph_bytes, options, self.weights)
        except Exception as exc:  # a model that ran as exported must not be lost to a rewrite
            reason = exc.message if isinstance(exc, EngineError) else type(exc).__name__
            log.warning("model %s is served as exported: normalising it failed: %s", name, reason)
            data_input = next(i for i in original.graph.input if i.name == self.input_name)
            batch: BatchMode = "one_row" if fixed_batch_of_one(data_input) else "free"
            normalized = Normalized(original, batch)
            graph_bytes = original.SerializeToString()
            forward = build_session(graph_bytes, options, self.weights)
        self.session = forward.session
        self.graph: onnx.ModelProto = with_shapes(normalized.model)
        """The normalised model (engines.graphs.normalize) that every session runs, with its
        inferred shapes (engines.graphs.shapes): the one parsed graph of the model."""
        self.batch_mode = normalized.batch
        self.graph_sha256 = hashlib.sha256(graph_bytes).hexdigest()
        self.layers: list[LayerInfo] = spatial_layers(self.graph, self.config.input)
        self._default_layer = default_layer(self.graph, self.layers, self.num_classes)
        self.activation_bytes = activation_bytes(self.graph)
        """What one image's forward run computes (estimated); gradient graphs hold about twice."""
        self.cost_bytes = self.weights.bytes + forward.cost_bytes + self.activation_bytes
        """What the loaded model holds before any prepared graph: weights, the forward session
        and its arena (kept: batched forward runs are occlusion's throughput)."""
        self.sessions = ModelSessions(name, options, self.budget, self.weights)
        self._plans: dict[tuple[int, tuple[int, ...], tuple[int, ...]], CutPlan | None] = {}
        self._plans_lock = threading.Lock()
        if self.input_name not in self.session.input_names:
            raise InvalidModel(f"config names input {self.input_name!r}, the model has none")
        if self.output_name not in self.session.output_names:
            raise InvalidModel(f"config names output {self.output_name!r}, the model has none")
        if self.one_row_per_run:
            batch_policy = None  # one row per run: nothing to batch across requests
        if batch_policy is not None:
            batch_policy = batch_policy.for_provider(self.session.provider)
        self.batch_policy = batch_policy
        self.gradients = GradientGraphs(
            model_path=model_path,
            model_sha256=self.graph_sha256,
            forward_graph=self.graph,
            one_row_per_run=self.one_row_per_run,
            output=self.output_name,
            num_classes=self.num_classes,
            layers={layer.name for layer in self.layers},
            cache_dir=cache_dir,
            sessions=self.sessions,
            activation_bytes=2 * self.activation_bytes,
            name=name,
            batch_policy=batch_policy,
            on_batch=on_batch,
        )
        # Per layer (so bounded by the layers): the suffix's graph itself, which holds weights,
        # lives only in its session, under the memory budget.
        self._suffixes: dict[str, SuffixReads] = {}
        self._suffix_lock = threading.Lock()
        self._forward_batcher = (
            None
            if batch_policy is None
            else MicroBatcher(f"{name}:forward", self._forward_many, batch_policy, on_batch)
        )

    def _normalized(self, original: onnx.ModelProto, model_path: Path) -> Normalized:
        """The model normalised for this config; a rewritten batch is kept only if it checks."""
        spec = self.config.input
        height_axis, width_axis = spec.spatial_axes
        spatial = {height_axis: spec.height, width_axis: spec.width}
        normalized = normalize(original, self.input_name, spatial)
        if normalized.batch != "rewritten":
            return normalized
        if _batch_rewrite_holds(normalized.model, model_path, self.input_name, self.output_name):
            return normalized
        return normalize(original, self.input_name, spatial, rewrite_batch=False)

    def rows_per_run(self, most: int, bytes_per_row: int) -> int:
        """Rows a batched method puts in one run: at most `most`, and what the budget has free
        for runs holding `bytes_per_row` each now (at least 1; a row that cannot fit is
        refused by the run's own reservation)."""
        free = self.budget.available_for_work()
        return max(1, min(most, free // max(1, bytes_per_row)))

    @property
    def one_row_per_run(self) -> bool:
        """The model's batch is fixed at 1 (and could not be made free)."""
        return self.batch_mode == "one_row"

    @property
    def default_layer(self) -> str | None:
        return self._default_layer

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def channel_axis(self) -> int:
        """Channel axis of batched input tensors (a feature map's is its LayerInfo's)."""
        return channel_axis(self.config.input.layout)

    def to_probabilities(self, outputs: np.ndarray) -> np.ndarray:
        return softmax(outputs) if self.config.output == "logits" else outputs

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def resolve_target(self, target: int | str) -> int:
        """A class index from an index or a label name (case-insensitive)."""
        if isinstance(target, int):
            if self.labels and not 0 <= target < len(self.labels):
                raise InvalidParameters(
                    f"target {target} is out of range: the model has {len(self.labels)} classes"
                )
            return target
        wanted = target.strip().lower()
        for index, label in enumerate(self.labels):
            if label.lower() == wanted:
                return index
        raise InvalidParameters(f"no class is labelled {target!r}")

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """The raw model output for a preprocessed batch, shape (N, classes).

        With batching on, the rows join other requests' rows in one onnxruntime run.
        """
        if self._forward_batcher is None:
            return self._forward(batch)
        return self._forward_batcher.submit(batch, rows=batch.shape[0])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        output = self._run(self.session, batch, self.output_name)
        return output.reshape(output.shape[0], -1)

    def forward_batch(self, batch: np.ndarray) -> np.ndarray:
        """`forward` for long batch jobs (occlusion, perturbation methods, Score-CAM, deletion
        and insertion curves): on a session with the batch threads when they differ from the
        short requests' (the weights are shared), else on the forward session. On CUDA threads
        do not matter and weights are not shared: it is the forward session."""
        # Otherwise the forward session itself, never a second copy of it under `sessions`.
        if self.session.provider != "CPUExecutionProvider" or not self.sessions.widens_batch_work():
            return self.forward(batch)
        session = self.sessions.wide("forward", None, lambda: self.graph, self.activation_bytes)
        output = self._run(session, batch, self.output_name)
        return output.reshape(output.shape[0], -1)

    def incremental_plan(self, window: int, tops: np.ndarray, lefts: np.ndarray) -> CutPlan | None:
        """Where occlusion with these windows can cut the graph (None: it runs whole)."""
        if self.one_row_per_run or self.config.input.layout != "NCHW":
            return None
        key = (window, tuple(tops.tolist()), tuple(lefts.tolist()))
        with self._plans_lock:
            if key in self._plans:
                return self._plans[key]
        plan = plan_cut(self.graph.graph, self.input_name, window, (tops, lefts))
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def incremental_sessions(self, plan: CutPlan) -> tuple[ModelSession, ModelSession]:
        """The sessions of the graph's part before `plan.cut` (on crops) and after it."""

        def part(index: int) -> Callable[[], onnx.ModelProto]:
            return lambda: split_model(self.graph, plan, [self.output_name])[index]

        prefix = self.sessions.get(
            "occlusion-prefix", plan.cut, part(0), self.activation_bytes, batch_work=True
        )
        suffix = self.sessions.get(
            "occlusion-suffix", plan.cut, part(1), self.activation_bytes, batch_work=True
        )
        return prefix, suffix

    def _run(self, session: ModelSession, batch: np.ndarray, output: str) -> np.ndarray:
        """One output of `session` for a batch; a model whose batch stays 1 runs it by rows."""
        if self.one_row_per_run and batch.shape[0] > 1:
            return np.concatenate([self._run(session, row[None], output) for row in batch])
        (values,) = session.run({self.input_name: batch}, [output])
        return values

    def _forward_many(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        outputs = self._forward(np.concatenate(batches))
        bounds = np.cumsum([0, *(b.shape[0] for b in batches)])
        return [outputs[start:end] for start, end in itertools.pairwise(bounds)]

    def occlusion_session(self, layer: str | None) -> ModelSession:
        """The model behind an in-graph occlusion prefix (engines.graphs.occlusion)."""
        from engines.graphs.occlusion import build_occlusion_model

        def make() -> onnx.ModelProto:
            spec = self.config.input
            return build_occlusion_model(
                self.graph,
                self.input_name,
                self.output_name,
                spec.layout,
                spec.height,
                spec.width,
                layer,
                (2, 3) if layer is None else self.layer(layer).spatial_axes,
            )

        return self.sessions.get("occlusion", layer, make, self.activation_bytes, batch_work=True)

    def layer_activations(self, batch: np.ndarray, layer: str) -> np.ndarray:
        """A layer's activations for a preprocessed batch (a session exposing that layer)."""
        self.gradients.check_layer(layer)
        (values,) = self.intermediates(batch, (layer,))
        return values

    def intermediates(self, batch: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """Tensors of the graph for a preprocessed batch (a session exposing them)."""

        def make() -> onnx.ModelProto:
            graph = onnx.ModelProto()
            graph.CopyFrom(self.graph)
            declared = {o.name for o in graph.graph.output}
            graph.graph.output.extend(
                onnx.ValueInfoProto(name=name) for name in names if name not in declared
            )
            return graph

        key = names[0] if len(names) == 1 else names
        session = self.sessions.get("activations", key, make, self.activation_bytes)
        if self.one_row_per_run and batch.shape[0] > 1:
            rows = [self.intermediates(row[None], names) for row in batch]
            return [np.concatenate(parts) for parts in zip(*rows, strict=True)]
        return list(session.run({self.input_name: batch}, list(names)))

    def suffix(self, layer: str) -> SuffixReads:
        """What the part of the graph after `layer` (engines.graphs.suffix) reads."""
        self.gradients.check_layer(layer)
        with self._suffix_lock:
            found = self._suffixes.get(layer)
            if found is None:
                found = build_suffix_model(self.graph, layer, self.output_name).reads
                self._suffixes[layer] = found
            return found

    def run_suffix(self, layer: str, rows: np.ndarray, boundary: list[np.ndarray]) -> np.ndarray:
        """The raw output (N, classes) for `rows` of `layer`'s activations; `boundary` holds the
        clean values (batch of 1) of what the part after the layer also reads. Batch work
        (Ablation-CAM's copies): it runs with the batch threads."""
        suffix = self.suffix(layer)

        def make() -> onnx.ModelProto:
            return build_suffix_model(self.graph, layer, self.output_name).model

        session = self.sessions.get("suffix", layer, make, suffix.activation_bytes, batch_work=True)
        count = rows.shape[0]
        per_run = 1 if self.one_row_per_run else count
        outputs = []
        for start in range(0, count, per_run):
            chunk = rows[start : start + per_run]
            feeds = {layer: chunk}
            for name, value in zip(suffix.boundary, boundary, strict=True):
                feeds[name] = np.repeat(value, chunk.shape[0], axis=0)
            (values,) = session.run(feeds, [self.output_name])
            outputs.append(values.reshape(chunk.shape[0], -1))
        return np.concatenate(outputs)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        return self.to_probabilities(self.forward(preprocess(images, self.config.input)))

    def predict(self, images: list[np.ndarray], top_k: int) -> list[list[Prediction]]:
        return [self.top_predictions(row, top_k) for row in self.probabilities(images)]

    def top_predictions(self, probabilities: np.ndarray, top_k: int) -> list[Prediction]:
        top = np.argsort(-probabilities, kind="stable")[: min(top_k, probabilities.shape[0])]
        return [Prediction(int(i), self.label(int(i)), float(probabilities[i])) for i in top]

    def layer(self, name: str) -> LayerInfo:
        """The listed layer `name` (InvalidParameters for a name the layer list lacks)."""
        self.gradients.check_layer(name)
        return next(info for info in self.layers if info.name == name)
