"""Builders that write ready-to-serve models (model.onnx, labels.txt, config.json).

Each builder fills an empty folder; `build_model` builds into a hidden temporary folder in the
repository and renames it into place, so a half-built model never appears under its name.
"""

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engines.errors import InvalidParameters
from engines.models.zoo import efficientnet_lite

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "efficientnet-lite0": efficientnet_lite.build,
}


def build_model(name: str, repository: Path, *, force: bool = False) -> Path:
    """Build model `name` into `repository / name` and return that folder.

    An existing model is kept unless `force`; then it is replaced in one rename.
    """
    builder = BUILDERS.get(name)
    if builder is None:
        known = ", ".join(sorted(BUILDERS))
        raise InvalidParameters(f"unknown model {name!r}; buildable models: {known}")
    target = repository / name
    if (target / "model.onnx").is_file() and not force:
        return target
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=repository))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the served folder must stay readable
    try:
        builder(staging)
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old model aside first.
    if not target.exists():
        staging.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    retired.rmdir()
    target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
