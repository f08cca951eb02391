"""A job's record: `manifest.jsonl`, one JSON line an image, and `job.json`, what the job was.

A line is appended (one write, flushed to disk) only after the image's map files are in place,
so a run killed at any moment leaves no line without its files; a line cut short by the kill is
dropped when the manifest is opened again. A rerun skips every image the manifest holds.
"""

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from engines.errors import InvalidParameters
from engines.graphs.prepared import write_file_atomically

MANIFEST_FILE = "manifest.jsonl"
JOB_FILE = "job.json"


def check_job(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder whose `job.json` says an earlier job made its maps another way: one
    manifest holds maps made one way."""
    path = folder / JOB_FILE
    if not path.is_file():
        return
    wanted = _as_json(settings)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidParameters(f"{path} is unreadable: {exc}") from exc
    if recorded != wanted:
        changed = sorted(
            key for key in set(recorded) | set(wanted) if recorded.get(key) != wanted.get(key)
        )
        raise InvalidParameters(
            f"{folder} holds the maps of another job (it differs in {', '.join(changed)}): "
            "choose another output folder, or remove this one"
        )


def record_job(folder: Path, settings: dict[str, Any]) -> None:
    """Write `job.json` (once: `check_job` keeps later jobs to the same settings)."""
    path = folder / JOB_FILE
    if not path.is_file():
        text = json.dumps(_as_json(settings), indent=2, sort_keys=True) + "\n"
        write_file_atomically(folder, path, text.encode())


def _as_json(settings: dict[str, Any]) -> Any:
    return json.loads(json.dumps(settings))  # as JSON reads back: tuples become lists


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a manifest, in order (none when it does not exist)."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]  # the last one is empty, or cut short
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except ValueError as exc:
        raise InvalidParameters(f"{path} holds a line that is not JSON: {exc}") from exc


class Manifest:
    """The manifest of an output folder, open for appending (a line cut short by a killed
    run is dropped first)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / MANIFEST_FILE
        self._cut_partial_line()
        self._file = self.path.open("ab")

    def _cut_partial_line(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            with self.path.open("r+b") as file:
                file.truncate(complete)

    def append(self, line: dict[str, Any]) -> None:
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
