"""Occlusion sensitivity as large batched inference.

Patches slide over the model's input; windows stay inside the image, and when the stride does
not land on the last row or column an extra window is aligned with that edge, so every pixel is
covered. Each pixel's value is the mean score drop over all windows covering it. Occluded copies
are made with vectorised numpy a batch at a time; the batch size comes from the memory budget.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np

from engines.errors import DeadlineExceeded, InvalidParameters, TooMuchWork, UnsupportedModel
from engines.graphs import occlusion as occlusion_graph
from engines.imaging.decode import blur_tensor, preprocess
from engines.methods.pipeline import Explained, Explainer, TargetMap, WorkLimits, clean_targets
from engines.models.layers import LayerInfo
from engines.models.loaded import LoadedModel
from engines.runtime import progress
from engines.runtime.deadline import current_deadline
from schemas.params import OcclusionParams

MAX_BATCH = 256
ACTIVATION_FACTOR = 32

Scorer = Callable[[np.ndarray], np.ndarray]
"""A batch of input tensors -> (B, scores): class scores, or a layer's per-channel means."""
WindowScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Windows' top and left corners (B,) -> the scores of the image occluded there (B, scores)."""
CUDA = "CUDAExecutionProvider"

_job_slots: dict[int, threading.BoundedSemaphore] = {}
_job_slots_lock = threading.Lock()


@contextlib.contextmanager
def job_slot(concurrent_jobs: int) -> Iterator[None]:
    """One of the process's `concurrent_jobs` occlusion slots, waited for within the deadline."""
    with _job_slots_lock:
        slots = _job_slots.setdefault(concurrent_jobs, threading.BoundedSemaphore(concurrent_jobs))
    deadline = current_deadline()
    timeout = None if deadline is None else max(deadline.remaining(), 0.0)
    if not slots.acquire(timeout=timeout):
        raise DeadlineExceeded("the request ran past its deadline waiting for an occlusion slot")
    try:
        yield
    finally:
        slots.release()


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    starts = np.arange(0, size - window + 1, stride)
    if starts[-1] != size - window:
        starts = np.append(starts, size - window)
    return starts


def occlusion_masks(
    tops: np.ndarray, lefts: np.ndarray, window: int, height: int, width: int
) -> np.ndarray:
    """(B, H, W) booleans, True inside each window."""
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    top, left = tops[:, None, None], lefts[:, None, None]
    masks: np.ndarray = (
        (rows >= top) & (rows < top + window) & (cols >= left) & (cols < left + window)
    )
    return masks


def box_sum(impulses: np.ndarray, window: int) -> np.ndarray:
    """out[s, y, x] = sum of impulses[s, y-window+1 .. y, x-window+1 .. x] (a window's reach)."""
    padded = np.pad(impulses, ((0, 0), (1, 0), (1, 0)))
    summed = padded.cumsum(axis=1).cumsum(axis=2)
    height, width = impulses.shape[1:]
    ys = np.arange(1, height + 1)
    xs = np.arange(1, width + 1)
    y0 = np.maximum(ys - window, 0)
    x0 = np.maximum(xs - window, 0)
    box: np.ndarray = (
        summed[:, ys][:, :, xs]
        - summed[:, y0][:, :, xs]
        - summed[:, ys][:, :, x0]
        + summed[:, y0][:, :, x0]
    )
    return box


def batch_size(input_bytes: int, budget_bytes: int) -> int:
    # onnxruntime's activations for one CNN image run to tens of times its input tensor; the
    # budget covers both, so a batch never balloons the process.
    per_image = input_bytes * ACTIVATION_FACTOR
    return int(max(1, min(MAX_BATCH, budget_bytes // per_image)))


class Occlusion(Explainer):
    params_model: ClassVar[type[OcclusionParams]] = OcclusionParams

    def __init__(self, copies_on_device: bool | None = None) -> None:
        """`copies_on_device`: make copies inside the graph (None: only on CUDA)."""
        self.copies_on_device = copies_on_device

    @staticmethod
    def host_copies(
        model: LoadedModel,
        tensor: np.ndarray,
        baseline: np.ndarray,
        scorer: Scorer,
        batch: int,
        window: int,
    ) -> WindowScorer:
        """Occluded copies made with numpy into one reused buffer, scored by `scorer`."""
        height, width = model.config.input.height, model.config.input.width
        copies = np.empty((batch, *tensor.shape[1:]), dtype=np.float32)

        def score(tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
            masks = occlusion_masks(tops, lefts, window, height, width)
            chunk = copies[: tops.size]
            chunk[:] = tensor
            np.copyto(chunk, baseline, where=np.expand_dims(masks, model.channel_axis))
            return scorer(chunk)

        return score

    @staticmethod
    def device_copies(
        model: LoadedModel, tensor: np.ndarray, baseline: np.ndarray, params: OcclusionParams
    ) -> WindowScorer:
        """Copies made inside the graph; image and baseline stay bound on the device."""
        layer = (
            Occlusion.feature_layer(model, params).name if params.score == "feature_dip" else None
        )
        session = model.occlusion_session(layer)
        bound = session.bind(
            {
                occlusion_graph.IMAGE: tensor,
                occlusion_graph.BASELINE: np.broadcast_to(baseline, tensor.shape).copy(),
                occlusion_graph.WINDOW: np.array([params.window], dtype=np.int64),
            }
        )
        output = occlusion_graph.LAYER_MEANS if layer is not None else model.output_name

        def score(tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
            feeds = {
                occlusion_graph.TOPS: tops.astype(np.int64),
                occlusion_graph.LEFTS: lefts.astype(np.int64),
            }
            (values,) = bound.run(feeds, [output])
            values = values.reshape(tops.size, -1)
            if params.score == "probability":
                return model.to_probabilities(values)
            return values

        return score

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: OcclusionParams,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        spec = model.config.input
        height, width = spec.height, spec.width
        if params.window > min(height, width):
            raise InvalidParameters(
                f"window {params.window} is larger than the model input {height}x{width}"
            )
        tops = window_starts(height, params.window, params.stride)
        lefts = window_starts(width, params.window, params.stride)
        passes = len(tops) * len(lefts)
        allowed = min(limits.max_passes, params.max_passes or limits.max_passes)
        if passes > allowed:
            raise TooMuchWork(
                f"window {params.window} with stride {params.stride} needs {passes} passes; "
                f"the limit is {allowed}"
            )
        grid_tops, grid_lefts = (a.ravel() for a in np.meshgrid(tops, lefts, indexing="ij"))
        # Waiting requests hold no copies: at most `concurrent_jobs` run at once.
        with job_slot(limits.concurrent_jobs):
            baseline = self.baseline(model, tensor, params)
            scorer = self.scorer(model, params)

            probabilities, targets = clean_targets(model, tensor, targets, top_k)
            # The clean probabilities are already at hand; other scores need their own pass.
            clean = probabilities[None] if params.score == "probability" else scorer(tensor)
            if params.score != "feature_dip":
                clean = clean[:, targets]

            batch = model.rows_per_run(
                progress.rows_per_report(
                    batch_size(tensor[0].nbytes, limits.memory_budget_bytes), passes
                ),
                model.activation_bytes,
            )
            maps_count = 1 if params.score == "feature_dip" else len(targets)
            impulses = np.zeros((maps_count, height, width), dtype=np.float64)
            on_device = (
                model.session.provider == CUDA
                if self.copies_on_device is None
                else self.copies_on_device
            )
            # A model whose batch stays 1 runs the copies one by one, through `forward`.
            on_device = on_device and not model.one_row_per_run
            score_windows = (
                self.device_copies(model, tensor, baseline, params)
                if on_device
                else self.host_copies(model, tensor, baseline, scorer, batch, params.window)
            )
            for start in range(0, passes, batch):
                chunk_tops = grid_tops[start : start + batch]
                chunk_lefts = grid_lefts[start : start + batch]
                scores = score_windows(chunk_tops, chunk_lefts)
                if params.score != "feature_dip":
                    scores = scores[:, targets]
                drops = (clean - scores).astype(np.float64)  # (B, targets or channels)
                if params.score == "feature_dip":
                    drops = drops.max(axis=1, keepdims=True)
                # Each window's drop is recorded at its top-left corner and spread by a box sum.
                for row, column_drops in zip(impulses, drops.T, strict=True):
                    np.add.at(row, (chunk_tops, chunk_lefts), column_drops)
                progress.report(start + chunk_tops.size, passes)
            counts = np.zeros((1, height, width), dtype=np.float64)
            np.add.at(counts[0], (grid_tops, grid_lefts), 1.0)
            maps = (box_sum(impulses, params.window) / box_sum(counts, params.window)).astype(
                np.float32
            )
            if params.score == "feature_dip":
                return Explained(probabilities, [TargetMap(t, maps[0]) for t in targets])
            return Explained(
                probabilities, [TargetMap(t, m) for t, m in zip(targets, maps, strict=True)]
            )

    @staticmethod
    def baseline(model: LoadedModel, tensor: np.ndarray, params: OcclusionParams) -> np.ndarray:
        spec = model.config.input
        channel_axis = model.channel_axis
        spatial = tuple(a for a in range(1, tensor.ndim) if a != channel_axis)
        if params.baseline == "mean":
            mean: np.ndarray = tensor.mean(axis=spatial, keepdims=True)
            return mean
        if params.baseline == "blur":
            return blur_tensor(tensor, channel_axis, max(spec.height, spec.width) / 20)
        pixels = np.full((spec.height, spec.width, 3), params.value, dtype=np.uint8)
        return preprocess([pixels], spec)

    @staticmethod
    def scorer(model: LoadedModel, params: OcclusionParams) -> Scorer:
        if params.score == "probability":

            def probability_score(batch: np.ndarray) -> np.ndarray:
                return model.to_probabilities(model.forward(batch))

            return probability_score
        if params.score == "logit":
            return model.forward
        layer = Occlusion.feature_layer(model, params)

        def feature_dip_score(batch: np.ndarray) -> np.ndarray:
            activations = model.layer_activations(batch, layer.name)
            means: np.ndarray = activations.mean(axis=layer.spatial_axes)  # (B, C)
            return means

        return feature_dip_score

    @staticmethod
    def feature_layer(model: LoadedModel, params: OcclusionParams) -> LayerInfo:
        """The layer whose channel means feature_dip watches."""
        layer = params.layer or model.default_layer
        if layer is None:
            raise UnsupportedModel("the model has no spatial layer for feature_dip")
        return model.layer(layer)
