"""The model repository: one subfolder per model, each loaded on its own.

Request paths never reach the filesystem: a name from a caller is only ever looked up in the
dictionary built from the folder listing.
"""

import enum
import functools
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engines.batcher import BatchPolicy
from engines.errors import EngineError, ModelNotFound, ModelNotReady
from engines.model import MODEL_FILE, LoadedModel
from engines.runtime import RuntimeOptions
from engines.support import MethodSupport, find_support

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

log = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelEntry:
    name: str
    folder: Path
    state: ModelState = ModelState.LOADING
    reason: str | None = None
    model: LoadedModel | None = field(default=None, repr=False)
    support: list[MethodSupport] = field(default_factory=list, repr=False)
    """Per explanation method, whether the model supports it and why not."""


class ModelRepository:
    def __init__(
        self,
        root: Path,
        options: RuntimeOptions,
        cache_dir: Path | None = None,
        batch_policy: BatchPolicy | None = None,
        on_batch: Callable[[str, int, int], None] | None = None,
    ) -> None:
        """`on_batch(model, rows, queued)` hears about every cross-request batch."""
        self.root = root
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
        for entry in self._entries.values():
            self._load(entry)
        self._loaded.set()

    def _load(self, entry: ModelEntry) -> None:
        try:
            cache = self.cache_dir / entry.name if self.cache_dir is not None else None
            hook = self.on_batch
            on_batch = None if hook is None else functools.partial(hook, entry.name)
            entry.model = LoadedModel(
                entry.name, entry.folder, self.options, cache, self.batch_policy, on_batch
            )
            entry.support = find_support(entry.model)
        except EngineError as exc:
            entry.state, entry.reason = ModelState.FAILED, exc.message
            log.warning("model %s failed to load: %s", entry.name, exc.message)
        except Exception as exc:  # a broken model must never take the others down
            entry.state, entry.reason = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("model %s failed to load", entry.name)
        else:
            entry.state = ModelState.READY
            log.info("model %s ready on %s", entry.name, entry.model.session.provider)

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    @property
    def ready(self) -> bool:
        """All models have been tried and at least one serves."""
        return self.loaded and any(e.state is ModelState.READY for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> ModelEntry:
        found = self._entries.get(name)
        if found is None:
            raise ModelNotFound(f"no model named {name!r}")
        return found

    def get(self, name: str) -> LoadedModel:
        entry = self.entry(name)
        if entry.state is ModelState.LOADING:
            raise ModelNotReady(f"model {name!r} is still loading")
        if entry.model is None:
            raise ModelNotReady(f"model {name!r} failed to load: {entry.reason}")
        return entry.model
