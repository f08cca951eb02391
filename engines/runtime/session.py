"""One onnxruntime session per model, with the provider choice made once and reported."""

import contextlib
import ctypes
import dataclasses
import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from engines.errors import InferenceFailed, InvalidModel
from engines.runtime import contention
from engines.runtime.deadline import guarded_run
from engines.runtime.memory import MemoryBudget

ProviderPreference = Literal["auto", "cpu", "cuda"]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    providers: ProviderPreference = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    spin_wait: bool = True
    """onnxruntime's pool threads spin between parallel sections; off, they sleep, leaving the
    cores to the rest of the process (decoding, rendering, HTTP) at some cost in latency."""
    batch_intra_op_threads: int = 0
    """Threads of the sessions that run long batch jobs (occlusion, SmoothGrad, Integrated
    Gradients, GradientSHAP, the perturbation methods, Score-/Ablation-CAM, deletion/insertion
    curves: `batch_work` sessions); 0: as many as `intra_op_threads`, so batch work runs on
    the same sessions as short requests."""

    def for_batches(self) -> "RuntimeOptions":
        """The options of batch work's sessions."""
        threads = self.batch_intra_op_threads or self.intra_op_threads
        return dataclasses.replace(self, intra_op_threads=threads, batch_intra_op_threads=0)

    @property
    def batches_apart(self) -> bool:
        """Batch work runs on sessions of its own (it has other threads)."""
        return bool(self.batch_intra_op_threads) and (
            self.batch_intra_op_threads != self.intra_op_threads
        )


@functools.cache
def cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDA even on machines without a GPU; look for the driver too.

    With a driver present, the CUDA and cuDNN libraries that pip installs (nvidia-* packages)
    are preloaded, since they are not on the loader's default path.
    """
    if _CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.suppress(Exception):
            preload()
    return True


@functools.cache
def _shared_cpu_arena() -> bool:
    """One CPU arena in onnxruntime's environment for every session that asks for it.

    A session's own arena keeps its largest run's activations for as long as the session
    lives; sessions on the shared arena reuse the same memory, so many prepared graphs cost
    one peak between them (without an arena, every run pays fresh page faults: saliency on
    EfficientNet-Lite0 ran 2.3x slower).
    """
    try:
        memory = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
    except Exception:  # an onnxruntime without it: sessions keep arenas of their own
        return False
    return True


def choose_providers(preference: ProviderPreference) -> list[str]:
    if preference == "cpu":
        return [_CPU]
    if cuda_usable():
        return [_CUDA, _CPU]
    if preference == "cuda":
        raise InvalidModel("CUDA was required by the settings but no usable CUDA was found")
    return [_CPU]


def _rows(feeds: dict[str, np.ndarray]) -> int:
    """The images in a run: the batch of its image-shaped (4-D or more) feeds."""
    return max((v.shape[0] for v in feeds.values() if v.ndim >= 4), default=1)


@dataclass(frozen=True)
class RunMemory:
    """What one image's run of a session holds, reserved from `budget` while it runs."""

    budget: MemoryBudget
    bytes_per_row: int


class ModelSession:
    """A thin wrapper over `ort.InferenceSession`: names, provider in use, and `run`."""

    def __init__(
        self,
        model: Path | bytes,
        options: RuntimeOptions,
        *,
        initializers: dict[str, ort.OrtValue] | None = None,
        optimised: bool = False,
        arena: bool = True,
        work: RunMemory | None = None,
    ) -> None:
        """`initializers` replace the graph's own by name (shared between sessions; they must
        outlive the session); `optimised`: onnxruntime already optimised the graph, for this
        machine (engines.runtime.shared), so it is not optimised again; `arena`: keep onnxruntime's
        memory arena, which holds a run's peak activations until the session goes (fastest
        for batches; off, activations are freed after each run); `work`: each run reserves
        its activations from a memory budget."""
        self.work = work
        session_options = ort.SessionOptions()
        if not arena and _shared_cpu_arena():
            session_options.add_session_config_entry("session.use_env_allocators", "1")
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if optimised
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        for name, value in (initializers or {}).items():
            session_options.add_initializer(name, value)
        session_options.log_severity_level = 3
        if not options.spin_wait:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(model) if isinstance(model, Path) else model,
                sess_options=session_options,
                providers=choose_providers(options.providers),
            )
        except InvalidModel:
            raise
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            name = model.name if isinstance(model, Path) else "the graph"
            raise InvalidModel(f"onnxruntime cannot load {name}: {exc}") from exc
        if options.providers == "cuda" and self.provider != _CUDA:
            raise InvalidModel("CUDA was required by the settings but the session fell back")
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.runs = 0
        """Runs made (counted before each starts): which session did a job's work."""
        self._runs_lock = threading.Lock()

    @property
    def intra_op_threads(self) -> int:
        """The intra-op threads onnxruntime was given (0: its default, one per core)."""
        return int(self._session.get_session_options().intra_op_num_threads)

    @property
    def provider(self) -> str:
        """The provider that actually runs the graph (onnxruntime may fall back to CPU)."""
        return str(self._session.get_providers()[0])

    def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        with self._runs_lock:
            self.runs += 1
        with contention.run_kind():
            if self.work is None:
                return self._run(feeds, output_names)
            with self.work.budget.reserve(_rows(feeds) * self.work.bytes_per_row, "a run"):
                return self._run(feeds, output_names)

    def _run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None
    ) -> list[np.ndarray]:
        # A batch's activations leave the arena after the run: what stays between runs is one
        # image's worth, which the budget counts with the session.
        with guarded_run(release_memory=_rows(feeds) > 1) as run_options:
            try:
                outputs = self._session.run(output_names, feeds, run_options)
            except Exception as exc:
                if run_options is not None and run_options.terminate:
                    raise
                raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
        return [np.asarray(o) for o in outputs]

    def bind(self, resident: dict[str, np.ndarray]) -> "BoundSession":
        """IO binding with `resident` inputs copied to the session's device once."""
        return BoundSession(self._session, self.provider, resident)


class BoundSession:
    """Runs with some inputs kept on the device (CUDA) between runs; others sent per run."""

    def __init__(
        self, session: ort.InferenceSession, provider: str, resident: dict[str, np.ndarray]
    ) -> None:
        self._session = session
        self._device = "cuda" if provider == _CUDA else "cpu"
        self._binding = session.io_binding()
        # Keep the OrtValues alive: the binding only refers to their memory.
        self._resident = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self._device, 0)
            for name, value in resident.items()
        }
        for name, value in self._resident.items():
            self._binding.bind_ortvalue_input(name, value)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        for name, value in feeds.items():
            self._binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self._binding.clear_binding_outputs()
        for name in output_names:
            self._binding.bind_output(name, "cpu")
        with guarded_run() as run_options:
            try:
                self._session.run_with_iobinding(self._binding, run_options)
            except Exception as exc:
                if run_options is not None and run_options.terminate:
                    raise
                raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
        return [np.asarray(o) for o in self._binding.copy_outputs_to_cpu()]
