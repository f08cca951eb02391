"""The sessions of one model: one copy of its weights, built under the memory budget, evicted
least recently used.

Every graph a model runs (forward, gradients per layer, activations, occlusion, maximization)
holds the model's weights, and most also hold weights derived from them the same way in every
graph (onnxruntime's blocked NCHWc copies of the Conv kernels, BN folded into a Conv). On the
CPU provider each graph is therefore optimised once by onnxruntime (ORT_ENABLE_ALL, as it would
at load), and every initializer of the optimised graph is looked up by content in the model's
`SharedWeights`: a kernel already held by another graph is handed to the new session with
`SessionOptions.add_initializer`, so a second graph costs its activations and code, not another
copy of the model. Measured on EfficientNet-Lite0 (17.7 MiB of weights): five graphs hold 106
MiB of optimised initializers, 30.5 MiB of them distinct; a graph's session then adds ~5 MiB
(onnxruntime's prepacked Gemm/MatMul weights) instead of 30-35 MiB. Without re-optimising
(ORT_ENABLE_EXTENDED, which shares plainly) the CPU graphs run 3x slower.
On CUDA, weights live on the device: sessions load as they are, without sharing.
"""

import hashlib
import logging
import tempfile
import threading
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from engines.errors import InvalidModel
from engines.runtime import contention
from engines.runtime.memory import MemoryBudget
from engines.runtime.schedule import seed_free_first
from engines.runtime.session import ModelSession, RunMemory, RuntimeOptions, choose_providers

log = logging.getLogger(__name__)

SHARED_MIN_BYTES = 1024
"""Initializers from this size on are shared; smaller ones stay in the graph."""
_WEIGHTS_FILE = "weights.bin"


GraphSource = onnx.ModelProto | bytes | Path


@dataclass(frozen=True)
class Built:
    session: ModelSession
    cost_bytes: int
    """What the session holds beyond the shared weights (estimated)."""


class SharedWeights:
    """Initializers by content, as OrtValues every session of one model reads."""

    def __init__(self) -> None:
        self._values: dict[str, ort.OrtValue] = {}
        self._arrays: dict[str, np.ndarray] = {}  # the OrtValues' memory
        self._lock = threading.Lock()
        self.bytes = 0

    def share(self, array: np.ndarray) -> ort.OrtValue:
        array = np.ascontiguousarray(array)
        digest = hashlib.sha256(array.data).hexdigest()
        key = f"{array.dtype.str}{array.shape}{digest}"
        with self._lock:
            found = self._values.get(key)
            if found is None:
                found = ort.OrtValue.ortvalue_from_numpy(array)
                self._values[key] = found
                self._arrays[key] = array
                self.bytes += array.nbytes
            return found

    def __len__(self) -> int:
        return len(self._values)


def _load(source: GraphSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, Path):
        return onnx.load(str(source))
    return onnx.load_from_string(source)


def _prepacked_bytes(model: onnx.ModelProto) -> int:
    """What onnxruntime's CPU kernels repack for themselves: the B matrices of Gemm/MatMul."""
    sizes = {t.name: int(np.prod(t.dims)) * 4 for t in model.graph.initializer if len(t.dims) == 2}
    return sum(
        sizes.get(n.input[1], 0)
        for n in model.graph.node
        if n.op_type in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul") and len(n.input) > 1
    )


SESSION_OVERHEAD_BYTES = 1 << 20
"""A session's graph, kernels and plans, beyond weights and activations (measured ~0.5-1 MiB)."""


def _read_matrices_unpacked(model: onnx.ModelProto) -> None:
    """Gemm/MatMul read their constant matrices through an Identity.

    onnxruntime's CPU kernels repack a constant B matrix for themselves, a copy per session
    (5 MiB for a 1280x1000 classifier head) that cannot be shared; through an Identity, which
    aliases its input (the graph is not optimised again), B is not constant and is read as is.
    """
    matrices = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    readers = ("Gemm", "MatMul", "FusedGemm", "FusedMatMul")
    aliases: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type in readers and len(node.input) > 1 and node.input[1] in matrices:
            weight = node.input[1]
            if weight not in aliases:
                aliases[weight] = f"{weight}/unpacked"
                nodes.append(onnx.helper.make_node("Identity", [weight], [aliases[weight]]))
            node.input[1] = aliases[weight]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def build_session(
    source: GraphSource,
    options: RuntimeOptions,
    weights: SharedWeights | None,
    *,
    arena: bool = True,
    work: RunMemory | None = None,
    seeds: Collection[str] = (),
) -> Built:
    """A session of `source`, reading shared weights where it can (see the module's note).

    Its cost counts what it holds between runs: weights of its own, prepacked copies, and (with
    `arena`) one image's activations; `work` reserves each run's activations while it runs.
    `seeds`: a gradient graph's seed tensors; what does not depend on them is scheduled first
    (engines.runtime.schedule)."""
    held = SESSION_OVERHEAD_BYTES + (work.bytes_per_row if arena and work is not None else 0)
    if weights is None or choose_providers(options.providers) != ["CPUExecutionProvider"]:
        model = _load(source)
        weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
        plain = source if isinstance(source, Path | bytes) else source.SerializeToString()
        session = ModelSession(plain, options, arena=arena, work=work)
        return Built(session, weight_bytes + held)
    try:
        return _shared_session(source, options, weights, arena, work, held, seeds)
    except InvalidModel:
        raise
    except Exception as exc:  # sharing is an optimisation: a graph it trips on runs as it is
        log.warning("graph runs without shared weights: %s: %s", type(exc).__name__, exc)
        return build_session(source, options, None, arena=arena, work=work, seeds=seeds)


def _shared_session(
    source: GraphSource,
    options: RuntimeOptions,
    weights: SharedWeights,
    arena: bool,
    work: RunMemory | None,
    held: int,
    seeds: Collection[str],
) -> Built:
    with tempfile.TemporaryDirectory(prefix="onnx-explain-optimise-") as folder:
        optimised_path = Path(folder) / "optimised.onnx"
        optimiser = ort.SessionOptions()
        optimiser.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        optimiser.intra_op_num_threads = 1
        optimiser.log_severity_level = 3
        optimiser.optimized_model_filepath = str(optimised_path)
        optimiser.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", _WEIGHTS_FILE
        )
        optimiser.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(SHARED_MIN_BYTES),
        )
        serialized = source.SerializeToString() if isinstance(source, onnx.ModelProto) else source
        try:
            ort.InferenceSession(
                str(serialized) if isinstance(serialized, Path) else serialized,
                sess_options=optimiser,
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:
            raise InvalidModel(f"onnxruntime cannot load the graph: {exc}") from exc
        optimised = onnx.load(str(optimised_path), load_external_data=False)
        shared: dict[str, ort.OrtValue] = {}
        for tensor in optimised.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            array = numpy_helper.to_array(tensor, base_dir=folder)
            shared[tensor.name] = weights.share(array)
        if not arena:
            _read_matrices_unpacked(optimised)
        if seeds:
            seed_free_first(optimised.graph, seeds)
        # The graph keeps its external references (the file exists until the session is
        # made), but every one of them is supplied by an OrtValue, so none is read.
        onnx.save(optimised, str(optimised_path))
        session = ModelSession(
            optimised_path, options, initializers=shared, optimised=True, arena=arena, work=work
        )
    return Built(session, _prepacked_bytes(optimised) + held)


class ModelSessions:
    """The prepared sessions of one model, each an entry of the memory budget."""

    def __init__(
        self,
        owner: str,
        options: RuntimeOptions,
        budget: MemoryBudget,
        weights: SharedWeights | None,
    ) -> None:
        self.owner = owner
        self.options = options
        self.budget = budget
        self.weights = weights
        self._sessions: dict[tuple[str, Hashable], tuple[ModelSession, int]] = {}
        self._building: dict[tuple[str, Hashable], threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def batches_apart(self) -> bool:
        """Batch work runs on sessions of its own: its threads differ from the short requests'
        and the graphs run on the CPU (on CUDA threads do not matter)."""
        return self.options.batches_apart and choose_providers(self.options.providers) == [
            "CPUExecutionProvider"
        ]

    def widens_batch_work(self) -> bool:
        """Whether this run of batch work goes to batch work's own sessions now: they run apart
        and no other request's short run needs the cores. Marks the request as batch work."""
        contention.mark_batch_work()
        return self.batches_apart and not contention.SHORT_RUNS.recent()

    @staticmethod
    def batch_kind(kind: str) -> str:
        """The kind under which batch work's session of `kind` is kept when it runs apart."""
        return f"{kind}:batch"

    def get(
        self,
        kind: str,
        key: Hashable,
        make: Callable[[], GraphSource],
        activation_bytes: int,
        seeds: Collection[str] = (),
        batch_work: bool = False,
    ) -> ModelSession:
        """The session of `(kind, key)`, built from `make()` if it is not resident.

        `activation_bytes`: what one image's run holds (estimated), reserved from the budget
        while a run holds it. Prepared sessions run without onnxruntime's arena, so between
        runs they hold little beyond their graph: many fit where each would otherwise keep its
        largest run's activations (EfficientNet-Lite0: 20-50 MiB a graph). `batch_work`: the
        session runs long batch jobs: with batch threads of their own (`batches_apart`), a
        second session of the same graph (its weights shared), kept as `batch_kind(kind)`,
        while no short run needs the cores (engines.runtime.contention); otherwise the one
        session of `(kind, key)`."""
        if batch_work and self.widens_batch_work():
            return self.wide(kind, key, make, activation_bytes, seeds)
        return self._get(kind, key, make, activation_bytes, seeds, self.options)

    def wide(
        self,
        kind: str,
        key: Hashable,
        make: Callable[[], GraphSource],
        activation_bytes: int,
        seeds: Collection[str] = (),
    ) -> ModelSession:
        """Batch work's own session of `(kind, key)`, with the batch threads (for a caller
        that `widens_batch_work` said yes to)."""
        options = self.options.for_batches()
        return self._get(self.batch_kind(kind), key, make, activation_bytes, seeds, options)

    def _get(
        self,
        kind: str,
        key: Hashable,
        make: Callable[[], GraphSource],
        activation_bytes: int,
        seeds: Collection[str],
        options: RuntimeOptions,
    ) -> ModelSession:
        slot = (kind, key)
        with self._lock:
            found = self._sessions.get(slot)
            if found is not None:
                self.budget.touch(found[1])
                return found[0]
            building = self._building.setdefault(slot, threading.Lock())
        with building:  # one build per graph; the others wait for it and then find it
            with self._lock:
                found = self._sessions.get(slot)
                if found is not None:
                    self.budget.touch(found[1])
                    return found[0]
            with self.budget.build_slot(kind):
                source = make()
                work = RunMemory(self.budget, activation_bytes)
                built = build_session(
                    source, options, self.weights, arena=False, work=work, seeds=seeds
                )
            entry = self.budget.admit(
                kind, self.owner, built.cost_bytes, lambda: self._forget(slot)
            )
            with self._lock:
                self._sessions[slot] = (built.session, entry)
                self._building.pop(slot, None)
            return built.session

    def resident(self, kind: str, key: Hashable) -> bool:
        with self._lock:
            return (kind, key) in self._sessions

    def resident_keys(self, kind: str) -> list[Hashable]:
        with self._lock:
            return [key for k, key in self._sessions if k == kind]

    def runs(self) -> dict[str, int]:
        """Runs made by the resident sessions, by kind (a batch kind: batch work apart)."""
        counts: dict[str, int] = {}
        with self._lock:
            for (kind, _), (session, _) in self._sessions.items():
                counts[kind] = counts.get(kind, 0) + session.runs
        return counts

    def _forget(self, slot: tuple[str, Hashable]) -> None:
        with self._lock:
            self._sessions.pop(slot, None)

    def clear(self) -> None:
        """Drop every session (the model is unloading); their budget entries go too."""
        with self._lock:
            self._sessions.clear()
        self.budget.release_owner(self.owner)
