"""What the black-box methods (RISE, LIME, KernelSHAP) share: masked copies of one image, scored
as large batched inference.

A method hands over how many passes it needs and a function that makes the keep-masks of any
run of passes; each copy is `baseline + mask * (image - baseline)`, made with numpy into one
reused buffer a batch at a time. Batches are sized from the memory budget as occlusion's are,
at most `concurrent_jobs` requests hold their copies at once, every session run honours the
request's deadline, and progress is reported after each batch.
"""

from collections.abc import Callable

import numpy as np

from engines.errors import TooMuchWork
from engines.imaging.decode import blur_tensor, preprocess
from engines.methods.occlusion import batch_size, job_slot
from engines.methods.pipeline import WorkLimits
from engines.models.loaded import LoadedModel
from engines.runtime import progress

Masks = Callable[[int, int], np.ndarray]
"""Passes [start, stop) -> their keep-masks, (stop - start, H, W) float32 in [0, 1]: 1 keeps
the image, 0 shows the baseline."""
Scores = Callable[[int, np.ndarray, np.ndarray], None]
"""Called in pass order with (the batch's first pass, its keep-masks (B, H, W), its scores
(B, classes))."""


def check_passes(passes: int, limits: WorkLimits, requested: int | None, what: str) -> None:
    allowed = min(limits.max_passes, requested or limits.max_passes)
    if passes > allowed:
        raise TooMuchWork(f"{what} needs {passes} passes; the limit is {allowed}")


def scorer(model: LoadedModel, score: str) -> Callable[[np.ndarray], np.ndarray]:
    """A batch of input tensors -> (B, classes): probabilities or logits."""
    if score == "probability":
        return lambda batch: model.to_probabilities(model.forward_batch(batch))
    return model.forward_batch


def baseline_tensor(
    model: LoadedModel, tensor: np.ndarray, kind: str, value: int = 128
) -> np.ndarray:
    """What hidden pixels turn into, broadcastable against `tensor` (1, ...)."""
    spec = model.config.input
    if kind == "zeros":
        return np.zeros_like(tensor)
    if kind == "mean":
        spatial = tuple(a for a in range(1, tensor.ndim) if a != model.channel_axis)
        mean: np.ndarray = tensor.mean(axis=spatial, keepdims=True)
        return mean
    if kind == "blur":
        return blur_tensor(tensor, model.channel_axis, max(spec.height, spec.width) / 20)
    pixels = np.full((spec.height, spec.width, 3), value, dtype=np.uint8)
    return preprocess([pixels], spec)


def score_masked_copies(
    model: LoadedModel,
    tensor: np.ndarray,
    baseline: np.ndarray,
    passes: int,
    masks: Masks,
    scores: Scores,
    score: str,
    limits: WorkLimits,
) -> None:
    """Score `passes` masked copies of `tensor`, a batch at a time (see the module doc)."""
    run = scorer(model, score)
    difference = (tensor - baseline).astype(np.float32)
    baseline = np.broadcast_to(baseline, tensor.shape).astype(np.float32)
    # Waiting requests hold no copies: at most `concurrent_jobs` run at once.
    with job_slot(limits.concurrent_jobs):
        batch = model.rows_per_run(
            progress.rows_per_report(
                batch_size(tensor[0].nbytes, limits.memory_budget_bytes), passes
            ),
            model.activation_bytes,
        )
        copies = np.empty((min(batch, passes), *tensor.shape[1:]), dtype=np.float32)
        for start in range(0, passes, batch):
            stop = min(passes, start + batch)
            keep = masks(start, stop)
            chunk = copies[: stop - start]
            np.multiply(np.expand_dims(keep, model.channel_axis), difference, out=chunk)
            chunk += baseline
            scores(start, keep, run(chunk))
            progress.report(stop, passes)
