"""Prepared gradient graphs of a model: built once, stored on disk, run through onnxruntime.

A prepared graph is keyed by the model's hash, the layer and the variant. `onnx-explain prepare`
writes them into the model's own folder (what a deployment ships); otherwise they are built on
first use into the cache folder, since deployments mount model folders read-only.
"""

import dataclasses
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.errors import InvalidModel, InvalidParameters, UnsupportedModel
from engines.graphs import GradientSpec, build_gradient_model
from engines.graphs.context import node_attribute
from engines.graphs.deeplift import REFERENCE
from engines.runtime.batcher import BatchPolicy, MicroBatcher
from engines.runtime.session import ModelSession
from engines.runtime.shared import ModelSessions

PREPARED_FOLDER = "gradients"
# Bumped whenever the graphs we build change shape, so stale cached files are never reused.
GRAPH_FORMAT = "g5"
SEED_INPUT = "seed"
TOP_K_INPUT = "top_k"
TARGETS_OUTPUT = "targets"


@dataclass(frozen=True)
class GraphKey:
    layer: str | None
    wrt_input: bool
    guided: bool
    top_k_seeds: bool
    """Seeds are the one-hot top-k classes of the model's own output, chosen inside the graph,
    so a request without explicit targets still costs a single run."""
    paired: bool = False
    """One seed per image (see `GradientSpec.paired`); with top-k seeds, each image's top-1.
    `GradientGraphs.run` picks it by itself whenever the rows pair up."""
    deeplift: bool = False
    """DeepLift's rescale rule; runs take the baseline as `reference`."""

    def file_name(self, model_sha256: str) -> str:
        parts = [model_sha256[:16], GRAPH_FORMAT]
        if self.layer is not None:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.layer)[:48]
            digest = hashlib.sha256(self.layer.encode()).hexdigest()[:8]
            parts.append(f"layer-{slug}-{digest}")
        if self.wrt_input:
            parts.append("input")
        if self.guided:
            parts.append("guided")
        if self.paired:
            parts.append("paired")
        if self.deeplift:
            parts.append("deeplift")
        parts.append("topk" if self.top_k_seeds else "seeded")
        return "-".join(parts) + ".onnx"


@dataclass(frozen=True)
class GradientResult:
    outputs: np.ndarray
    """The model output for each input row, (N, classes)."""
    targets: np.ndarray
    """The class seeded in each gradient row, (M,)."""
    activation: np.ndarray | None
    grad_layer: np.ndarray | None
    grad_input: np.ndarray | None

    def row(self, index: int) -> "GradientResult":
        """The result of image `index` of a batch run with one seed per image."""
        window = slice(index, index + 1)

        def part(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[window]

        return GradientResult(
            outputs=self.outputs[window],
            targets=self.targets[window],
            activation=part(self.activation),
            grad_layer=part(self.grad_layer),
            grad_input=part(self.grad_input),
        )


def add_top_k_seeds(
    model: onnx.ModelProto, output: str, num_classes: int, *, paired: bool = False
) -> onnx.ModelProto:
    """Replace the `seed` input by one-hot rows of the top-k classes of `output`.

    Valid for one image with k >= 1, or several images with k = 1; a paired graph takes
    each image's top-1 (ArgMax keeps the batch dimension the seed must share) and has no
    `top_k` input. Otherwise adds an int64 input `top_k` of shape [1]. Adds an output
    `targets` with the class of each seed row.
    """
    graph = model.graph
    kept_inputs = [i for i in graph.input if i.name != SEED_INPUT]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    prefix = "topk_seed/"
    graph.initializer.extend(
        [
            helper.make_tensor(prefix + "depth", TensorProto.INT64, [1], [num_classes]),
            helper.make_tensor(prefix + "values", TensorProto.FLOAT, [2], [0.0, 1.0]),
        ]
    )
    if paired:
        choose = [helper.make_node("ArgMax", [output], [TARGETS_OUTPUT], axis=-1, keepdims=0)]
    else:
        graph.input.append(helper.make_tensor_value_info(TOP_K_INPUT, TensorProto.INT64, [1]))
        graph.initializer.append(helper.make_tensor(prefix + "flat", TensorProto.INT64, [1], [-1]))
        choose = [
            helper.make_node(
                "TopK", [output, TOP_K_INPUT], [prefix + "scores", prefix + "indices"], axis=-1
            ),
            # (N, k) -> (N * k,): one image with k seeds, or N images with one seed each.
            helper.make_node("Reshape", [prefix + "indices", prefix + "flat"], [TARGETS_OUTPUT]),
        ]
    nodes = [
        *choose,
        helper.make_node(
            "OneHot", [TARGETS_OUTPUT, prefix + "depth", prefix + "values"], [SEED_INPUT], axis=-1
        ),
    ]
    # Seeds must exist before the backward nodes that read them: put them first in the order
    # after the forward nodes by inserting right after the node producing `output`.
    producer = next(i for i, n in enumerate(graph.node) if output in n.output)
    reordered = [*graph.node[: producer + 1], *nodes, *graph.node[producer + 1 :]]
    del graph.node[:]
    graph.node.extend(_rows_for_one_hot_seeds(reordered, graph))
    read = {name for n in graph.node for name in n.input}
    unread = [i for i in graph.initializer if i.name.startswith(prefix) and i.name not in read]
    for initializer in unread:
        graph.initializer.remove(initializer)
    targets_dim: int | str | None = "k"
    if paired:
        # The targets keep the images' batch dimension: declaring another name here would
        # override it and cost the backward its blocked layout.
        scores = next(o for o in graph.output if o.name == output).type.tensor_type.shape.dim
        targets_dim = (scores[0].dim_param or scores[0].dim_value or None) if scores else None
    graph.output.append(
        helper.make_tensor_value_info(TARGETS_OUTPUT, TensorProto.INT64, [targets_dim])
    )
    return model


def _rows_for_one_hot_seeds(
    nodes: Sequence[onnx.NodeProto], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """The nodes with `seed @ W` (a classifier head's backward) read as rows of W.

    With one-hot seeds the product picks the targets' rows; a Gather does that without
    reading the whole weight matrix (~0.16 ms of a 6 ms Grad-CAM on EfficientNet-Lite0).
    The product is a Gemm (a Gemm head) or a MatMul with W or its Transpose (a MatMul head).
    """
    readers = [n for n in nodes if SEED_INPUT in n.input]
    if len(readers) != 1:
        return list(nodes)
    product = readers[0]
    picked = _head_weight(product, nodes, graph)
    if picked is None:
        return list(nodes)
    weight, classes_axis = picked
    dropped = {id(product)}
    transposes = [n for n in nodes if product.input[1] in n.output and n.op_type == "Transpose"]
    if transposes and sum(product.input[1] in n.input for n in nodes) == 1:
        dropped.add(id(transposes[0]))
    rows = [n for n in nodes if id(n) not in dropped and SEED_INPUT not in n.output]
    gather = [weight, TARGETS_OUTPUT]
    if classes_axis == 0:  # W is [classes, features]
        picks = [helper.make_node("Gather", gather, product.output, axis=0)]
    else:  # W is [features, classes]
        columns = product.output[0] + "/columns"
        picks = [
            helper.make_node("Gather", gather, [columns], axis=1),
            helper.make_node("Transpose", [columns], product.output, perm=[1, 0]),
        ]
    at = next(i for i, n in enumerate(rows) if TARGETS_OUTPUT in n.output) + 1
    return [*rows[:at], *picks, *rows[at:]]


def _head_weight(
    product: onnx.NodeProto, nodes: Sequence[onnx.NodeProto], graph: onnx.GraphProto
) -> tuple[str, int] | None:
    """The constant 2-D matrix that `seed @ ...` multiplies and its classes axis, if plain."""
    matrices = {i.name for i in graph.initializer if len(i.dims) == 2}
    inputs = [i for i in product.input if i]
    if product.domain not in ("", "ai.onnx") or len(inputs) != 2 or inputs[0] != SEED_INPUT:
        return None
    operand = inputs[1]
    if product.op_type == "Gemm":
        if node_attribute(product, "alpha", 1.0) != 1.0 or node_attribute(product, "transA", 0):
            return None
        return (operand, int(node_attribute(product, "transB", 0))) if operand in matrices else None
    if product.op_type != "MatMul":
        return None
    if operand in matrices:
        return operand, 0
    producer = next((n for n in nodes if operand in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in matrices:
        return None
    perm = node_attribute(producer, "perm", [1, 0])
    return (producer.input[0], 1) if list(perm) == [1, 0] else None


TENSORS_FOLDER = "tensors"
STORED_APART_BYTES = 1024
"""Initializers from this size on are stored once per content, beside the graph files."""


def write_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` at `path`, its large initializers as files named by their content.

    Every graph of a model holds the model's weights and often the same derived ones (a
    kernel flipped for the backward pass): each distinct tensor is written once, in
    `tensors/` beside the graph files, and the graphs refer to it as external data, so a
    second graph on disk costs its structure, not another copy of the weights. `model` is
    changed in place (its initializers become references)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store = path.parent / TENSORS_FOLDER
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        data = numpy_helper.to_array(tensor).tobytes()
        if len(data) < STORED_APART_BYTES:
            continue
        location = f"{TENSORS_FOLDER}/{hashlib.sha256(data).hexdigest()}.bin"
        if not (path.parent / location).is_file():
            write_file_atomically(store, path.parent / location, data)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for key, value in (("location", location), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
    write_file_atomically(path.parent, path, model.SerializeToString())


def write_file_atomically(folder: Path, path: Path, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class GradientGraphs:
    """The gradient sessions of one model, built or loaded on first use and then kept."""

    def __init__(
        self,
        model_path: Path,
        forward_graph: onnx.ModelProto,
        model_sha256: str,
        output: str,
        num_classes: int,
        layers: set[str],
        cache_dir: Path | None,
        sessions: ModelSessions,
        activation_bytes: int,
        name: str = "model",
        batch_policy: BatchPolicy | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        one_row_per_run: bool = False,
    ) -> None:
        """`forward_graph`: the (normalised) model the graphs are built from; `model_sha256`,
        its digest, keys them; prepared graphs live beside `model_path`.
        `one_row_per_run`: the model's batch is fixed at 1, so batches run row by row."""
        self.name = name
        self.forward_graph = forward_graph
        self.one_row_per_run = one_row_per_run
        self.batch_policy = batch_policy
        self.on_batch = on_batch
        self._batchers: dict[
            GraphKey, MicroBatcher[tuple[np.ndarray, np.ndarray | None], GradientResult]
        ] = {}
        self.model_path = model_path
        self.model_sha256 = model_sha256
        self.output = output
        self.num_classes = num_classes
        self.layers = layers
        self.cache_dir = cache_dir
        self.sessions = sessions
        self.activation_bytes = activation_bytes
        """What one image's run of a gradient graph holds (estimated)."""
        self._lock = threading.Lock()

    @property
    def prepared_dir(self) -> Path:
        return self.model_path.parent / PREPARED_FOLDER

    def check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise InvalidParameters(
                f"unknown layer {layer!r}: use one of the layers GET /v1/models/{{name}} lists"
            )

    def build(self, key: GraphKey) -> onnx.ModelProto:
        spec = GradientSpec(
            output=self.output,
            layer=key.layer,
            wrt_input=key.wrt_input,
            guided=key.guided,
            paired=key.paired,
            deeplift=key.deeplift,
        )
        gradient_model = build_gradient_model(self.forward_graph, spec)
        if key.top_k_seeds:
            gradient_model = add_top_k_seeds(
                gradient_model, self.output, self.num_classes, paired=key.paired
            )
        return gradient_model

    def prepare(self, key: GraphKey, folder: Path) -> Path:
        """Build the graph for `key` into `folder` (used by `onnx-explain prepare`)."""
        path = folder / key.file_name(self.model_sha256)
        write_atomically(self.build(key), path)
        return path

    def _locate_or_build(self, key: GraphKey) -> Path | bytes:
        """A prepared file, a cached file, or (with no cache folder) the graph in memory."""
        name = key.file_name(self.model_sha256)
        prepared = self.prepared_dir / name
        if prepared.is_file():
            return prepared
        if self.cache_dir is None:
            serialized: bytes = self.build(key).SerializeToString()
            return serialized
        cached = self.cache_dir / name
        if not cached.is_file():
            write_atomically(self.build(key), cached)
        return cached

    def session(self, key: GraphKey, batch_work: bool = False) -> ModelSession:
        """The session of `key`; with `batch_work`, the one long jobs run on (see
        `ModelSessions.get`: a second session of the graph when batch threads differ)."""
        if key.layer is not None:
            self.check_layer(key.layer)
        try:
            return self.sessions.get(
                "gradient",
                key,
                lambda: self._locate_or_build(key),
                self.activation_bytes,
                seeds=(SEED_INPUT, TOP_K_INPUT, TARGETS_OUTPUT),
                batch_work=batch_work,
            )
        except InvalidModel as exc:  # the model loaded; it is this graph that cannot
            raise UnsupportedModel(
                f"onnxruntime cannot run this model's gradient graph: {exc.message}"
            ) from exc

    @staticmethod
    def warm_keys(layer: str | None) -> list[GraphKey]:
        """The graphs a one-image, top-1 Grad-CAM (at `layer`), saliency and guided backprop
        request runs: worth building before the first request."""
        keys = [
            GraphKey(None, wrt_input=True, guided=False, top_k_seeds=True, paired=True),
            GraphKey(None, wrt_input=True, guided=True, top_k_seeds=True, paired=True),
        ]
        if layer is not None:
            keys.insert(
                0, GraphKey(layer, wrt_input=False, guided=False, top_k_seeds=True, paired=True)
            )
        return keys

    def resident(self, key: GraphKey) -> bool:
        return self.sessions.resident("gradient", key)

    def run(
        self,
        key: GraphKey,
        input_name: str,
        batch: np.ndarray,
        *,
        seeds: np.ndarray | None = None,
        top_k: int | None = None,
        reference: np.ndarray | None = None,
        batch_work: bool = False,
    ) -> GradientResult:
        """One gradient run; single-image, single-target runs are batched across requests.

        `reference`: the baseline of a DeepLift graph, one row per image of `batch`;
        `batch_work`: a long job's run (SmoothGrad, Integrated Gradients, GradientSHAP), on the
        session with the batch threads, never joined with short requests' rows."""
        one_seed_each = (
            top_k == 1 if key.top_k_seeds else seeds is not None and seeds.shape[0] == len(batch)
        )
        key = dataclasses.replace(key, paired=one_seed_each)
        single = batch.shape[0] == 1 and one_seed_each
        if self.one_row_per_run and batch.shape[0] > 1:
            return self._run_rows(key, input_name, batch, seeds, top_k, reference, batch_work)
        if self.batch_policy is None or not single or reference is not None or batch_work:
            return self._run(key, input_name, batch, seeds, top_k, reference, batch_work)
        return self._batcher(key, input_name).submit((batch, seeds))

    def _run_rows(
        self,
        key: GraphKey,
        input_name: str,
        batch: np.ndarray,
        seeds: np.ndarray | None,
        top_k: int | None,
        reference: np.ndarray | None = None,
        batch_work: bool = False,
    ) -> GradientResult:
        """A batch of images with one seed each, one image per run (a fixed batch of 1)."""
        if not key.paired:
            raise InvalidParameters("this model takes one image per run: one target per image")
        rows = [
            self._run(
                key,
                input_name,
                batch[i : i + 1],
                None if seeds is None else seeds[i : i + 1],
                top_k,
                None if reference is None else reference[i : i + 1],
                batch_work,
            )
            for i in range(batch.shape[0])
        ]

        def joined(values: list[np.ndarray | None]) -> np.ndarray | None:
            present = [v for v in values if v is not None]
            return np.concatenate(present) if present else None

        return GradientResult(
            outputs=np.concatenate([r.outputs for r in rows]),
            targets=np.concatenate([r.targets for r in rows]),
            activation=joined([r.activation for r in rows]),
            grad_layer=joined([r.grad_layer for r in rows]),
            grad_input=joined([r.grad_input for r in rows]),
        )

    def _batcher(
        self, key: GraphKey, input_name: str
    ) -> MicroBatcher[tuple[np.ndarray, np.ndarray | None], GradientResult]:
        assert self.batch_policy is not None
        with self._lock:
            found = self._batchers.get(key)
            if found is None:

                def run_many(
                    items: Sequence[tuple[np.ndarray, np.ndarray | None]],
                ) -> list[GradientResult]:
                    stacked = np.concatenate([b for b, _ in items])
                    seeds = (
                        None
                        if key.top_k_seeds
                        else np.concatenate([s for _, s in items if s is not None])
                    )
                    result = self._run(key, input_name, stacked, seeds, 1)
                    return [result.row(i) for i in range(len(items))]

                found = MicroBatcher(
                    f"{self.name}:gradients", run_many, self.batch_policy, self.on_batch
                )
                self._batchers[key] = found
            return found

    def _run(
        self,
        key: GraphKey,
        input_name: str,
        batch: np.ndarray,
        seeds: np.ndarray | None,
        top_k: int | None,
        reference: np.ndarray | None = None,
        batch_work: bool = False,
    ) -> GradientResult:
        session = self.session(key, batch_work)
        feeds: dict[str, np.ndarray] = {input_name: batch}
        if key.deeplift:
            if reference is None or reference.shape != batch.shape:
                raise ValueError("a DeepLift graph needs a reference shaped like the batch")
            feeds[REFERENCE] = reference.astype(np.float32, copy=False)
        if top_k is not None and self.num_classes:
            top_k = min(top_k, self.num_classes)  # TopK fails on k above the class count
        if key.top_k_seeds:
            if top_k is None or (batch.shape[0] != 1 and top_k != 1):
                raise ValueError("top-k seeding needs one image, or several with top_k 1")
            if key.paired and top_k != 1:
                raise ValueError("a paired top-k graph seeds each image's top-1 only")
            if not key.paired:
                feeds[TOP_K_INPUT] = np.array([top_k], dtype=np.int64)
        else:
            if seeds is None:
                raise ValueError("seeded gradient graphs need seeds")
            if key.paired and len(seeds) != len(batch):
                raise ValueError("a paired gradient graph needs one seed per image")
            feeds[SEED_INPUT] = seeds.astype(np.float32, copy=False)
        names = [self.output]
        if key.layer is not None:
            names += ["activation", "grad_layer"]
        if key.wrt_input:
            names.append("grad_input")
        if key.top_k_seeds:
            names.append(TARGETS_OUTPUT)
        values = dict(zip(names, session.run(feeds, names), strict=True))
        if key.top_k_seeds:
            targets = values[TARGETS_OUTPUT].astype(np.int64).reshape(-1)
        else:
            assert seeds is not None
            targets = seeds.argmax(axis=1)
        return GradientResult(
            outputs=values[self.output].reshape(batch.shape[0], -1),
            targets=targets,
            activation=values.get("activation"),
            grad_layer=values.get("grad_layer"),
            grad_input=values.get("grad_input"),
        )
