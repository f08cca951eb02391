"""Read a state dict saved in PyTorch's legacy (pre-zip) format, without PyTorch.

Layout: magic-number pickle, protocol-version pickle, sys-info pickle, the main pickle (whose
persistent ids name storages), a pickle listing the storage keys, then for every key an int64
element count and the raw little-endian storage bytes.

The unpickler resolves only the handful of globals a state dict needs; anything else (os.system,
builtins.eval, ...) is refused before it can be called.
"""

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafePickleError(pickle.UnpicklingError):
    """The checkpoint refers to something outside the allow-list."""


class UnsupportedCheckpoint(ValueError):
    """The file is not a legacy-format PyTorch state dict we can read."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype[Any]


@dataclass
class _Storage:
    dtype: np.dtype[Any]
    numel: int
    data: npt.NDArray[Any] | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsupportedCheckpoint("a tensor is not backed by a storage")
    # The storage bytes come after the main pickle, so tensors are materialised later.
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    return data


def _allowed_global(module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
        return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
        return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise UnsafePickleError(f"refusing to load global {module}.{name}: not in the allow-list")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        return _allowed_global(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsupportedCheckpoint(f"unexpected persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or view is not None:
            raise UnsupportedCheckpoint("unsupported storage type or storage view")
        storage = self._storages.setdefault(str(key), _Storage(storage_type.dtype, int(numel)))
        if storage.dtype != storage_type.dtype:
            raise UnsupportedCheckpoint(f"storage {key} is used with two dtypes")
        return storage


def _load(file: IO[bytes], storages: dict[str, _Storage]) -> Any:
    return _Unpickler(file, storages).load()


def _read_storage(file: IO[bytes], storage: _Storage) -> None:
    numel = int.from_bytes(file.read(8), "little", signed=True)
    nbytes = numel * storage.dtype.itemsize
    raw = file.read(nbytes)
    if numel != storage.numel or len(raw) != nbytes:
        raise UnsupportedCheckpoint("storage size does not match its header, or file truncated")
    storage.data = np.frombuffer(raw, dtype=storage.dtype)


def _materialise(ref: _TensorRef) -> npt.NDArray[Any]:
    data = ref.storage.data
    if data is None:
        raise UnsupportedCheckpoint("a tensor's storage has no data in the file")
    if len(ref.size) != len(ref.stride) or min((*ref.size, *ref.stride, ref.offset), default=0) < 0:
        raise UnsupportedCheckpoint("malformed tensor size or stride")
    # as_strided does no bounds checking: make sure the view stays inside the storage.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if 0 not in ref.size and last >= data.size:
        raise UnsupportedCheckpoint("tensor view lies outside its storage")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :], shape=ref.size, strides=[s * data.itemsize for s in ref.stride]
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C")


def _read_checkpoint(file: IO[bytes]) -> dict[Any, Any]:
    storages: dict[str, _Storage] = {}
    if _load(file, storages) != _MAGIC_NUMBER:
        raise UnsupportedCheckpoint("not a legacy PyTorch checkpoint")
    if _load(file, storages) != _PROTOCOL_VERSION:
        raise UnsupportedCheckpoint("unsupported legacy protocol version")
    sys_info = _load(file, storages)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
        raise UnsupportedCheckpoint("only little-endian checkpoints are supported")
    state = _load(file, storages)
    keys = _load(file, {})
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise UnsupportedCheckpoint("the checkpoint is not a state dict")
    for key in keys:
        if str(key) not in storages:
            raise UnsupportedCheckpoint(f"unknown storage key {key!r:.50}")
        _read_storage(file, storages[str(key)])
    return state


def load_legacy_state_dict(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Return {name: array} for every tensor of a legacy-format state dict.

    Raises UnsafePickleError for a global outside the allow-list, UnsupportedCheckpoint for
    anything else that is not a legacy state dict (the zip format included).
    """
    with path.open("rb") as file:
        if file.peek(2)[:2] == b"PK":
            raise UnsupportedCheckpoint(f"{path.name} is a zip-format checkpoint, not legacy")
        try:
            state = _read_checkpoint(file)
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError) as exc:
            raise UnsupportedCheckpoint(f"{path.name} is truncated or corrupt: {exc}") from exc
    result: dict[str, npt.NDArray[Any]] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise UnsupportedCheckpoint(f"entry {name!r:.50} is not a tensor")
        result[str(name)] = _materialise(ref)
    return result
