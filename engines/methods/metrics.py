"""Faithfulness of a map: RISE's deletion and insertion curves (Petsiuk et al., 2018).

The image is the one the model sees (model resolution, after resize or crop). Its pixels are
ranked by the map, highest first (ties in row-major order), and for k = 0..steps the first
floor(k * pixels / steps) of them are changed: deletion paints them grey (128 in every
channel); insertion starts from a Gaussian blur of the image (sigma 5 pixels) and restores
them. Each copy's score is the target's probability, and the AUC is the trapezoid rule over the
fraction axis [0, 1]. A faithful map drops the score fast under deletion (low AUC) and raises it
fast under insertion (high AUC).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from engines.errors import InvalidParameters
from engines.imaging.decode import normalize_fitted
from engines.methods.occlusion import copies_per_run, job_slot
from engines.methods.pipeline import WorkLimits
from engines.models.loaded import LoadedModel
from engines.runtime import progress

MetricKind = Literal["deletion", "insertion"]
DELETION_GREY = 128
INSERTION_BLUR_SIGMA = 5.0


@dataclass(frozen=True)
class Curve:
    fractions: np.ndarray
    """(steps + 1,) the share of ranked pixels changed: k / steps."""
    scores: np.ndarray
    """(steps + 1,) the target's probability at each fraction."""
    auc: float


def pixel_order(heatmap: np.ndarray) -> np.ndarray:
    """Flat pixel indices, highest map value first, ties in row-major order."""
    order: np.ndarray = np.argsort(-heatmap.astype(np.float64).ravel(), kind="stable")
    return order


def changed_counts(pixels: int, steps: int) -> np.ndarray:
    """How many ranked pixels copy k changes, k = 0..steps."""
    counts: np.ndarray = (np.arange(steps + 1) * pixels) // steps
    return counts


def curve_images(pixels: np.ndarray, kind: MetricKind) -> tuple[np.ndarray, np.ndarray]:
    """The start image and the image the ranked pixels come from, both (H, W, 3) uint8."""
    if kind == "deletion":
        return pixels, np.full_like(pixels, DELETION_GREY)
    return cv2.GaussianBlur(pixels, (0, 0), INSERTION_BLUR_SIGMA), pixels


def trapezoid_area(xs: np.ndarray, ys: np.ndarray) -> float:
    return float(((ys[1:] + ys[:-1]) * np.diff(xs)).sum() / 2)


def faithfulness(
    model: LoadedModel,
    pixels: np.ndarray,
    heatmap: np.ndarray,
    target: int,
    kinds: Sequence[MetricKind],
    steps: int = 32,
    limits: WorkLimits = WorkLimits(),
) -> dict[MetricKind, Curve]:
    """Deletion and/or insertion curves of `heatmap` for `target`, as batched inference.

    `pixels`: the RGB image at model resolution (H, W, 3) uint8; `heatmap`: (H, W) at the same
    resolution. Progress is reported per curve, one unit per copy scored.
    """
    height, width = pixels.shape[:2]
    if heatmap.shape != (height, width):
        raise InvalidParameters(
            f"a {heatmap.shape} map cannot rank the pixels of a {height}x{width} input"
        )
    if steps < 1:
        raise InvalidParameters("a curve needs at least one step")
    order = pixel_order(heatmap)
    counts = changed_counts(height * width, steps)
    fractions = np.arange(steps + 1, dtype=np.float64) / steps
    rows_per_batch = copies_per_run(model, pixels.nbytes * 4, steps + 1, limits)
    curves: dict[MetricKind, Curve] = {}
    with job_slot(limits.concurrent_jobs):
        for kind in kinds:
            start, source = curve_images(pixels, kind)
            flat_start = start.reshape(-1, 3)
            flat_source = source.reshape(-1, 3)
            scores = np.empty(steps + 1, dtype=np.float64)
            for first in range(0, steps + 1, rows_per_batch):
                chunk = counts[first : first + rows_per_batch]
                copies = np.repeat(flat_start[None], chunk.size, axis=0)
                for copy, count in zip(copies, chunk, strict=True):
                    changed = order[:count]
                    copy[changed] = flat_source[changed]
                batch = normalize_fitted(copies.reshape(-1, height, width, 3), model.config.input)
                probabilities = model.to_probabilities(model.forward_batch(batch))
                scores[first : first + chunk.size] = probabilities[:, target]
                progress.report(first + chunk.size, steps + 1)
            curves[kind] = Curve(fractions, scores, trapezoid_area(fractions, scores))
    return curves
