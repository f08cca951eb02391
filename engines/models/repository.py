"""The model repository: one subfolder per model, each loaded on its own.

Request paths never reach the filesystem: a name from a caller is only ever looked up in the
dictionary built from the folder listing.

Models share one memory budget (engines.runtime.memory) with their prepared sessions. At start-
up the models are loaded in order while the budget holds them; the others stay `unloaded` and
load on first use, and a model is unloaded when its memory is needed and it is the least
recently used thing resident (Triton's model control, decided by the budget). Right after a
model loads, the gradient graphs of its default layer are built in the background (`warm`).
"""

import contextlib
import enum
import functools
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engines.errors import EngineError, ModelNotFound, ModelNotReady, OverBudget
from engines.models.loaded import MODEL_FILE, LoadedModel
from engines.models.support import MethodSupport, find_support
from engines.runtime.batcher import BatchPolicy
from engines.runtime.memory import MemoryBudget
from engines.runtime.session import RuntimeOptions

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

log = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


LOAD_FACTOR = 3
"""Loading holds the file's bytes about this many times over (the parsed graph, the normalised
copy, onnxruntime's optimiser) until the model's own cost is known."""


@dataclass
class ModelEntry:
    name: str
    folder: Path
    state: ModelState = ModelState.LOADING
    reason: str | None = None
    model: LoadedModel | None = field(default=None, repr=False)
    support: list[MethodSupport] = field(default_factory=list, repr=False)
    """Per explanation method, whether the model supports it and why not."""
    budget_entry: int | None = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Held while the model loads, so concurrent first requests wait for one load."""

    @property
    def serves(self) -> bool:
        """Loaded, or loadable on first use."""
        return self.state in (ModelState.LOADED, ModelState.UNLOADED)


class ModelRepository:
    def __init__(
        self,
        root: Path,
        options: RuntimeOptions,
        cache_dir: Path | None = None,
        batch_policy: BatchPolicy | None = None,
        on_batch: Callable[[str, int, int], None] | None = None,
        budget: MemoryBudget | None = None,
        warm: bool = True,
    ) -> None:
        """`on_batch(model, rows, queued)` hears about every cross-request batch; `warm` builds
        each model's default-layer gradient graphs in the background once it loads."""
        self.root = root
        self.budget = budget if budget is not None else MemoryBudget()
        self.warm = warm
        self.options = options
        self.cache_dir = cache_dir
        self.batch_policy = batch_policy
        self.on_batch = on_batch
        self._entries: dict[str, ModelEntry] = {}
        self._loaded = threading.Event()
        self.discover()

    def discover(self) -> None:
        """List model folders. Folders with odd names are skipped, never escaped."""
        entries: dict[str, ModelEntry] = {}
        if self.root.is_dir():
            for folder in sorted(self.root.iterdir()):
                if not folder.is_dir() or not MODEL_NAME_PATTERN.fullmatch(folder.name):
                    continue
                if (folder / MODEL_FILE).is_file():
                    entries[folder.name] = ModelEntry(folder.name, folder)
        self._entries = entries

    def load_all(self) -> None:
        """Load the models in order while the budget has room (with their graphs warm); the rest
        load on first use."""
        for entry in self._entries.values():
            needed = self._load_estimate(entry)
            if self.budget.used_bytes() + needed > self.budget.limit_bytes:
                entry.state = ModelState.UNLOADED
                continue
            with entry.lock, contextlib.suppress(OverBudget):
                self._load(entry, warm_in_background=False)
        self._loaded.set()

    @staticmethod
    def _load_estimate(entry: ModelEntry) -> int:
        try:
            return (entry.folder / MODEL_FILE).stat().st_size * LOAD_FACTOR
        except OSError:
            return 0

    def _load(self, entry: ModelEntry, warm_in_background: bool = True) -> None:
        """Load one model; at start-up its graphs are warmed before readiness, later (a load
        on first use) in the background, so that request does not wait for them."""
        entry.state = ModelState.LOADING
        try:
            with self.budget.reserve(self._load_estimate(entry), f"loading model {entry.name}"):
                cache = self.cache_dir / entry.name if self.cache_dir is not None else None
                hook = self.on_batch
                on_batch = None if hook is None else functools.partial(hook, entry.name)
                model = LoadedModel(
                    entry.name,
                    entry.folder,
                    self.options,
                    cache,
                    self.batch_policy,
                    on_batch,
                    budget=self.budget,
                )
                entry.support = find_support(model)
            entry.budget_entry = self.budget.admit(
                "model", entry.name, model.cost_bytes, functools.partial(self._unload, entry)
            )
            entry.model = model
        except OverBudget as exc:  # no room now: it can load later, when memory frees up
            entry.state, entry.reason = ModelState.UNLOADED, exc.message
            log.warning("model %s not loaded: %s", entry.name, exc.message)
            raise
        except EngineError as exc:
            entry.state, entry.reason = ModelState.FAILED, exc.message
            log.warning("model %s failed to load: %s", entry.name, exc.message)
        except Exception as exc:  # a broken model must never take the others down
            entry.state, entry.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("model %s failed to load", entry.name)
        else:
            entry.state, entry.reason = ModelState.LOADED, None
            log.info("model %s ready on %s", entry.name, model.session.provider)
            if self.warm and warm_in_background:
                threading.Thread(
                    target=warm_graphs, args=(model,), name=f"warm-{entry.name}", daemon=True
                ).start()
            elif self.warm:
                warm_graphs(model)

    def _unload(self, entry: ModelEntry) -> None:
        """The budget needs this model's memory (it was the least recently used)."""
        model = entry.model
        if model is None:
            return
        entry.model, entry.budget_entry = None, None
        entry.state, entry.reason = ModelState.UNLOADED, None
        model.sessions.clear()
        log.info("model %s unloaded to make room in the memory budget", entry.name)

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        """All models have been tried and at least one serves."""
        return self.loaded and any(e.serves for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        found = self._entries.get(name)
        if found is None:
            raise ModelNotFound(f"no model named {name!r}")
        return found

    def get(self, name: str) -> LoadedModel:
        """The loaded model `name`, loading it first if it is unloaded (this call blocks)."""
        entry = self.entry(name)
        model = entry.model
        if model is None and entry.state is ModelState.UNLOADED:
            with entry.lock:
                if entry.model is None and entry.state is ModelState.UNLOADED:
                    self._load(entry)
                model = entry.model
        if model is None:
            if entry.state is ModelState.LOADING:
                raise ModelNotReady(f"model {name!r} is still loading")
            raise ModelNotReady(f"model {name!r} failed to load: {entry.reason}")
        if entry.budget_entry is not None:
            self.budget.touch(entry.budget_entry)
        return model


def warm_graphs(model: LoadedModel) -> None:
    """Build (and persist) the default layer's Grad-CAM, saliency and guided graphs."""
    for key in model.gradients.warm_keys(model.default_layer):
        try:
            model.gradients.session(key)
        except EngineError as exc:  # unsupported here: the request will say why
            log.info("model %s: graph %s not warmed: %s", model.name, key, exc.message)
        except Exception:
            log.exception("model %s: warming graph %s failed", model.name, key)
