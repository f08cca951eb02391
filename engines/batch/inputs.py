"""The images of a job: a folder of image files, a text file of paths, or a table (CSV or
Parquet) with a column of paths.

Each image has a key, the name the manifest records it by: its path relative to the folder, or
the path as the list or table writes it (relative paths there are read from the list's own
folder).
"""

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engines.errors import InvalidParameters

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_COLUMN = "image"

InputKind = Literal["folder", "list", "csv", "parquet"]


@dataclass(frozen=True)
class ImageItem:
    key: str
    """How the manifest names the image."""
    path: Path


def input_kind(source: Path) -> InputKind:
    if source.is_dir():
        return "folder"
    if not source.is_file():
        raise InvalidParameters(f"{source} is neither a folder nor a file")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "list"


def read_inputs(
    source: Path, column: str = DEFAULT_COLUMN, outside: Path | None = None
) -> list[ImageItem]:
    """Every image `source` names, in its order (a folder's files sorted by path); a folder's
    files under `outside` (a job's output folder inside its input) are not its images."""
    kind = input_kind(source)
    if kind == "folder":
        return folder_images(source, outside)
    if kind == "list":
        keys = list_keys(source)
    elif kind == "csv":
        keys = csv_keys(source, column)
    else:
        keys = parquet_keys(source, column)
    return items_from_keys(keys, source.parent)


def folder_images(folder: Path, outside: Path | None = None) -> list[ImageItem]:
    """The image files under `folder`, subfolders included, by their relative paths."""
    found = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and (outside is None or not path.is_relative_to(outside))
    ]
    keyed = sorted((path.relative_to(folder).as_posix(), path) for path in found)
    return [ImageItem(key, path) for key, path in keyed]


def items_from_keys(keys: Iterable[str], base: Path) -> list[ImageItem]:
    """Items for paths as a list writes them, each once; relative ones lie under `base`."""
    unique = dict.fromkeys(key for key in keys if key)
    return [ImageItem(key, resolve(key, base)) for key in unique]


def resolve(key: str, base: Path) -> Path:
    path = Path(key).expanduser()
    return path if path.is_absolute() else base / path


def list_keys(source: Path) -> list[str]:
    """One path a line; blank lines and lines starting with # are skipped."""
    lines = _read_text(source).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def csv_keys(source: Path, column: str) -> list[str]:
    rows = csv.DictReader(_read_text(source).splitlines())
    if rows.fieldnames is None or column not in rows.fieldnames:
        raise InvalidParameters(_missing_column(source, column, rows.fieldnames or []))
    return [(row[column] or "").strip() for row in rows]


def parquet_keys(source: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InvalidParameters(
            "reading Parquet needs pyarrow: pip install 'onnx-explain[ray]' (or pyarrow)"
        ) from exc
    try:
        names = pq.read_schema(source).names
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError for what is no Parquet
        raise InvalidParameters(f"{source} is not a readable Parquet file") from exc
    if column not in names:
        raise InvalidParameters(_missing_column(source, column, names))
    values = pq.read_table(source, columns=[column]).column(column).to_pylist()
    return [str(value).strip() for value in values if value is not None]


def _missing_column(source: Path, column: str, names: Sequence[str]) -> str:
    return f"{source} has no column {column!r} (columns: {', '.join(names) or 'none'})"


def _read_text(source: Path) -> str:
    try:
        return source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameters(f"cannot read {source} as text: {exc}") from exc
