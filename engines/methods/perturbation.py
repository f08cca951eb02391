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

from engines.methods.occlusion import copies_per_run, job_slot
from engines.methods.pipeline import WorkLimits, class_scorer
from engines.models.loaded import LoadedModel
from engines.runtime import progress

Masks = Callable[[int, int], np.ndarray]
"""Passes [start, stop) -> their keep-masks, (stop - start, H, W) float32 in [0, 1]: 1 keeps
the image, 0 shows the baseline."""
Scores = Callable[[int, np.ndarray, np.ndarray], None]
"""Called in pass order with (the batch's first pass, its keep-masks (B, H, W), its scores
(B, classes))."""


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
    run = class_scorer(model, score)
    difference = (tensor - baseline).astype(np.float32)
    baseline = np.broadcast_to(baseline, tensor.shape).astype(np.float32)
    # Waiting requests hold no copies: at most `concurrent_jobs` run at once.
    with job_slot(limits.concurrent_jobs):
        batch = copies_per_run(model, tensor[0].nbytes, passes, limits)
        copies = np.empty((min(batch, passes), *tensor.shape[1:]), dtype=np.float32)
        for start in range(0, passes, batch):
            stop = min(passes, start + batch)
            keep = masks(start, stop)
            chunk = copies[: stop - start]
            np.multiply(np.expand_dims(keep, model.channel_axis), difference, out=chunk)
            chunk += baseline
            scores(start, keep, run(chunk))
            progress.report(stop, passes)
