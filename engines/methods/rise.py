"""RISE (Petsiuk et al. 2018): the score-weighted mean of random smooth masks.

Each mask is a coarse `grid` x `grid` of cells kept with `probability`, bilinearly upsampled to
(grid + 1) cells of ceil(side / grid) pixels and cropped at a random shift within one cell, so
the cell edges fall anywhere. The map of a target is sum_i score_i * mask_i / (masks *
probability): the expected score given that a pixel is kept.
"""

from typing import ClassVar

import cv2
import numpy as np

from engines.methods.perturbation import Masks, score_masked_copies
from engines.methods.pipeline import (
    Explained,
    Explainer,
    TargetMap,
    WorkLimits,
    baseline_tensor,
    check_passes,
    clean_targets,
)
from engines.models.loaded import LoadedModel
from engines.runtime.blas import single_threaded_blas
from schemas.params import RiseParams

CV_MAX_CHANNELS = 128  # the planes cv2.resize takes at once (OpenCV 5; 4.x takes 512)


def rise_masks(params: RiseParams, height: int, width: int) -> Masks:
    """The masks of passes [start, stop), asked for in order; the same for any batching."""
    grid = params.grid
    cell_h, cell_w = -(-height // grid), -(-width // grid)
    up_size = ((grid + 1) * cell_w, (grid + 1) * cell_h)  # cv2 wants (width, height)
    cells_seed, shifts_seed = np.random.SeedSequence(params.seed).spawn(2)
    shifts = np.random.default_rng(shifts_seed).integers(
        0, (cell_h, cell_w), size=(params.masks, 2)
    )
    # Drawn batch by batch from one stream: consecutive draws read it in order, so the cells
    # do not depend on the batch size.
    cells = np.random.default_rng(cells_seed)

    def make(start: int, stop: int) -> np.ndarray:
        count = stop - start
        grids = (cells.random((count, grid, grid)) < params.probability).astype(np.float32)
        masks = np.empty((count, height, width), dtype=np.float32)
        for first in range(0, count, CV_MAX_CHANNELS):
            planes = grids[first : first + CV_MAX_CHANNELS]
            upsampled = cv2.resize(
                np.ascontiguousarray(planes.transpose(1, 2, 0)),
                up_size,
                interpolation=cv2.INTER_LINEAR,
            ).reshape(up_size[1], up_size[0], planes.shape[0])
            for i in range(planes.shape[0]):
                top, left = shifts[start + first + i]
                masks[first + i] = upsampled[top : top + height, left : left + width, i]
        return masks

    return make


class Rise(Explainer):
    params_model: ClassVar[type[RiseParams]] = RiseParams

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: RiseParams,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        height, width = model.config.input.height, model.config.input.width
        check_passes(params.masks, limits, params.max_passes, f"RISE with {params.masks} masks")
        probabilities, targets = clean_targets(model, tensor, targets, top_k)
        sums = np.zeros((len(targets), height * width), dtype=np.float64)

        def add(start: int, keep: np.ndarray, scores: np.ndarray) -> None:
            weights = scores[:, targets].T.astype(np.float32)
            with single_threaded_blas():
                sums[...] += weights @ keep.reshape(keep.shape[0], -1)

        score_masked_copies(
            model,
            tensor,
            baseline_tensor(model, tensor, params.baseline, params.value),
            params.masks,
            rise_masks(params, height, width),
            add,
            params.score,
            limits,
        )
        maps = (sums / (params.masks * params.probability)).reshape(-1, height, width)
        return Explained(
            probabilities,
            [TargetMap(t, m.astype(np.float32)) for t, m in zip(targets, maps, strict=True)],
        )
