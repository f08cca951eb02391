"""The same job on Ray Data: the images to explain become a dataset, an actor pool explains them
(each actor loads the model once and runs a `BatchWorker`), and the driver appends each line the
actors send back to the manifest, after the actor has written that image's files.

The actors read the images and write the maps themselves: on a cluster of several machines the
inputs and the output folder must be at the same paths on every node (a shared filesystem).
Ray is the optional extra `onnx-explain[ray]`.
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.batch.inputs import ImageItem
from engines.batch.job import BatchSpec, BatchWorker, JobSummary, Progress, run_job
from engines.errors import InvalidParameters
from engines.runtime.session import RuntimeOptions

LOCAL = "local"
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
"""The object store of a local Ray: only paths and manifest lines travel through it."""


@dataclass(frozen=True)
class RayOptions:
    address: str = LOCAL
    """A running cluster's address (`ray://host:10001`, `auto`), or `local` to start one here."""
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    images_per_call: int = 8
    """Rows of each batch an actor receives."""


class RayBatchWorker:
    """One actor of the pool: a loaded model, called with batches of `image`/`path` rows."""

    def __init__(self, spec: BatchSpec) -> None:
        self.worker = BatchWorker(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [
            ImageItem(str(key), Path(str(path)))
            for key, path in zip(batch["image"], batch["path"], strict=True)
        ]
        lines = [json.dumps(line, ensure_ascii=False) for line in self.worker.explain_all(items)]
        return {"line": np.array(lines, dtype=object)}


def connect(options: RayOptions) -> Callable[[], None]:
    """Initialise Ray: start a local one for `local`, join the cluster at the address
    otherwise, or keep the session this process already has. Returns what ends it."""
    import ray

    if ray.is_initialized():
        return lambda: None
    if options.address == LOCAL:
        wanted = options.actors * options.cpus_per_actor + 1  # one more for the read tasks
        ray.init(
            num_cpus=max(1, min(os.cpu_count() or 1, int(np.ceil(wanted)))),
            num_gpus=int(np.ceil(options.actors * options.gpus_per_actor)),
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        try:
            ray.init(address=options.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InvalidParameters(f"cannot join Ray at {options.address}: {exc}") from exc
    return ray.shutdown


def run_on_ray(
    spec: BatchSpec,
    items: list[ImageItem],
    options: RayOptions,
    progress: Progress | None = None,
) -> JobSummary:
    """`run_job` with its images explained in a Ray Data actor pool: the same files, manifest."""
    try:
        import ray.data
    except ImportError as exc:
        raise InvalidParameters("--ray needs Ray Data: pip install 'onnx-explain[ray]'") from exc

    # Each actor's onnxruntime threads fit the CPUs Ray gives it.
    threads = max(1, int(options.cpus_per_actor))
    actor_spec = dataclasses.replace(
        spec, runtime=dataclasses.replace(spec.runtime, intra_op_threads=threads)
    )

    def start(todo: list[ImageItem]) -> Iterator[dict[str, Any]]:
        # A refusal (a method the model does not support, an unknown target) is found here,
        # once, rather than as every actor's failure to start; Ray is joined before the job
        # writes anything.
        BatchWorker(dataclasses.replace(spec, runtime=RuntimeOptions(providers="cpu")))
        return lines(todo, connect(options))

    def lines(todo: list[ImageItem], disconnect: Callable[[], None]) -> Iterator[dict[str, Any]]:
        try:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts lines
            rows = [{"image": item.key, "path": str(item.path)} for item in todo]
            blocks = min(len(rows), options.actors * 4)
            made = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                RayBatchWorker,
                fn_constructor_kwargs={"spec": actor_spec},
                batch_size=options.images_per_call,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=options.actors),
                num_cpus=options.cpus_per_actor,
                num_gpus=options.gpus_per_actor,
            )
            for batch in made.iter_batches(batch_size=None, batch_format="numpy"):
                for text in batch["line"]:
                    yield json.loads(str(text))
        finally:
            disconnect()

    return run_job(spec, items, progress, start)
