"""Occlusion sensitivity as large batched inference.

Patches slide over the model's input; windows stay inside the image, and when the stride does
not land on the last row or column an extra window is aligned with that edge, so every pixel is
covered. Each pixel's value is the mean score drop over all windows covering it. Occluded copies
are made with vectorised numpy a batch at a time; the batch size comes from the memory budget.

Copies are scored incrementally where the graph has a cut that saves work (Krypton: the part
before the cut runs on a crop around each patch, engines.graphs.incremental), inside the graph
on CUDA (IO binding), else through the whole model; all of them on the batch-work sessions.
Fast mode runs a coarse grid, interpolates the rest and drills down exactly where the estimated
map is highest (the paper's adaptive drill-down).
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np

from engines.errors import DeadlineExceeded, InvalidParameters, UnsupportedModel
from engines.graphs import occlusion as occlusion_graph
from engines.graphs.incremental import Crop, CutPlan
from engines.methods.pipeline import (
    Explained,
    Explainer,
    TargetMap,
    WorkLimits,
    baseline_tensor,
    check_passes,
    class_scorer,
    clean_targets,
)
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


def averaged(
    drops: np.ndarray, tops: np.ndarray, lefts: np.ndarray, window: int, height: int, width: int
) -> np.ndarray:
    """(maps, H, W): each pixel's mean drop over the windows covering it (0 where none does).

    `drops` is (windows, maps); each window's drop is recorded at its top-left corner and
    spread by a box sum."""
    impulses = np.zeros((drops.shape[1], height, width), dtype=np.float64)
    for row, column_drops in zip(impulses, drops.T, strict=True):
        np.add.at(row, (tops, lefts), column_drops)
    counts = np.zeros((1, height, width), dtype=np.float64)
    np.add.at(counts[0], (tops, lefts), 1.0)
    covering = box_sum(counts, window)
    summed = box_sum(impulses, window)
    mean: np.ndarray = np.divide(
        summed, covering, out=np.zeros_like(summed), where=covering > 0
    ).astype(np.float32)
    return mean


def top_region(maps: np.ndarray, fraction: float) -> np.ndarray:
    """(H, W) booleans: the pixels in the top `fraction` of any map (each scaled to its peak)."""
    peaks = np.abs(maps).reshape(maps.shape[0], -1).max(axis=1)
    scaled = (maps / np.maximum(peaks, 1e-12)[:, None, None]).max(axis=0)
    threshold = np.quantile(scaled, 1 - fraction)
    chosen: np.ndarray = scaled >= threshold
    return chosen


def windows_touching(
    region: np.ndarray, tops: np.ndarray, lefts: np.ndarray, window: int
) -> np.ndarray:
    """Booleans over the windows: which ones cover any pixel of `region`."""
    summed = np.pad(region.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    bottoms, rights = tops + window, lefts + window
    inside = (
        summed[bottoms, rights]
        - summed[tops, rights]
        - summed[bottoms, lefts]
        + summed[tops, lefts]
    )
    touching: np.ndarray = inside > 0
    return touching


class _Sweep:
    """Runs windows through a scorer batch by batch and returns their drops from the clean
    score; counts the passes and reports progress over all the sweeps of one request."""

    def __init__(
        self,
        params: OcclusionParams,
        targets: list[int],
        clean: np.ndarray,
        batch: int,
    ) -> None:
        self.params = params
        self.targets = targets
        self.clean = clean
        self.batch = batch
        self.done = 0

    def run(self, score_windows: WindowScorer, tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
        """(windows, maps): one column per target, or (feature_dip) the largest channel drop."""
        feature_dip = self.params.score == "feature_dip"
        found: list[np.ndarray] = []
        total = self.done + tops.size
        for start in range(0, tops.size, self.batch):
            chunk_tops = tops[start : start + self.batch]
            chunk_lefts = lefts[start : start + self.batch]
            scores = score_windows(chunk_tops, chunk_lefts)
            if not feature_dip:
                scores = scores[:, self.targets]
            drops = (self.clean - scores).astype(np.float64)
            found.append(drops.max(axis=1, keepdims=True) if feature_dip else drops)
            self.done += chunk_tops.size
            progress.report(self.done, total)
        if not found:
            return np.zeros((0, 1 if feature_dip else len(self.targets)))
        return np.concatenate(found)


def batch_size(input_bytes: int, budget_bytes: int) -> int:
    # onnxruntime's activations for one CNN image run to tens of times its input tensor; the
    # budget covers both, so a batch never balloons the process.
    per_image = input_bytes * ACTIVATION_FACTOR
    return int(max(1, min(MAX_BATCH, budget_bytes // per_image)))


def copies_per_run(model: LoadedModel, input_bytes: int, passes: int, limits: WorkLimits) -> int:
    """Rows of one run of a job of `passes` input copies of `input_bytes` each: what the budget
    allows, what it has free now, and few enough for a listener's progress reports."""
    most = batch_size(input_bytes, limits.memory_budget_bytes)
    return model.rows_per_run(progress.rows_per_report(most, passes), model.activation_bytes)


class Occlusion(Explainer):
    params_model: ClassVar[type[OcclusionParams]] = OcclusionParams

    def __init__(
        self,
        copies_on_device: bool | None = None,
        incremental: bool | None = None,
    ) -> None:
        """`copies_on_device`: make copies inside the graph (None: only on CUDA).

        `incremental`: False runs every copy through the whole graph (None: incremental
        wherever the graph has a cut that saves work).
        """
        self.copies_on_device = copies_on_device
        self.incremental = incremental

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

    @staticmethod
    def incremental_copies(
        model: LoadedModel,
        plan: CutPlan,
        tensor: np.ndarray,
        baseline: np.ndarray,
        params: OcclusionParams,
    ) -> WindowScorer:
        """Krypton's exact incremental copies (engines.graphs.incremental): the graph's part
        before the cut runs on a crop around each window, its changed region is pasted into
        the clean image's activation at the cut, and the rest runs on full maps."""
        prefix, suffix = model.incremental_sessions(plan)
        (clean_cut,) = prefix.run({model.input_name: tensor}, [plan.cut])
        covered = np.broadcast_to(baseline, tensor.shape)
        crop_height, crop_width = plan.crop
        stride_height, stride_width = plan.stride
        window = params.window
        row_crops: dict[int, Crop] = {}
        column_crops: dict[int, Crop] = {}

        def crop_of(crops: dict[int, Crop], axis: int, start: int) -> Crop:
            if start not in crops:
                (crops[start],) = plan.crops(axis, [start])
            return crops[start]

        def score(tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
            count = tops.size
            crops = np.empty((count, tensor.shape[1], crop_height, crop_width), np.float32)
            places: list[tuple[Crop, Crop]] = []
            for index, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist(), strict=True)):
                rows, columns = crop_of(row_crops, 0, top), crop_of(column_crops, 1, left)
                places.append((rows, columns))
                y, x = rows.start, columns.start
                crops[index] = tensor[0, :, y : y + crop_height, x : x + crop_width]
                # The patch, clipped to the crop (what lies outside is never read).
                y0, y1 = max(top, y), min(top + window, y + crop_height)
                x0, x1 = max(left, x), min(left + window, x + crop_width)
                crops[index, :, y0 - y : y1 - y, x0 - x : x1 - x] = covered[0, :, y0:y1, x0:x1]
            (recomputed,) = prefix.run({model.input_name: crops}, [plan.cut])
            cuts = np.repeat(clean_cut, count, axis=0)
            for index, (rows, columns) in enumerate(places):
                (a0, a1), (b0, b1) = rows.changed, columns.changed
                dy, dx = rows.start // stride_height, columns.start // stride_width
                cuts[index, :, a0:a1, b0:b1] = recomputed[
                    index, :, a0 - dy : a1 - dy, b0 - dx : b1 - dx
                ]
            (values,) = suffix.run({plan.cut: cuts}, [model.output_name])
            values = values.reshape(count, -1)
            if params.score == "probability":
                return model.to_probabilities(values)
            return values

        return score

    def window_scorer(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        params: OcclusionParams,
        batch: int,
        grid: tuple[np.ndarray, np.ndarray],
    ) -> tuple[WindowScorer, CutPlan | None]:
        """How copies are made and scored: in the graph (CUDA), incrementally, or plainly.

        `grid`: the windows' possible tops and lefts (the incremental crops must cover them)."""
        baseline = self.baseline(model, tensor, params)
        on_device = (
            model.session.provider == CUDA
            if self.copies_on_device is None
            else self.copies_on_device
        )
        # A model whose batch stays 1 runs the copies one by one, through `forward`.
        if on_device and not model.one_row_per_run:
            return self.device_copies(model, tensor, baseline, params), None
        plan = None
        if self.incremental is not False and params.score != "feature_dip":
            plan = model.incremental_plan(params.window, *grid)
        if plan is not None:
            return self.incremental_copies(model, plan, tensor, baseline, params), plan
        scorer = self.scorer(model, params)
        return self.host_copies(model, tensor, baseline, scorer, batch, params.window), None

    @staticmethod
    def drill_down(
        sweep: "_Sweep",
        score_windows: WindowScorer,
        params: OcclusionParams,
        tops: np.ndarray,
        lefts: np.ndarray,
        size: tuple[int, int],
    ) -> np.ndarray:
        """Fast mode's drops for every window of the grid (Krypton's adaptive drill-down).

        A coarse pass runs every k-th window of the grid on each axis; the other windows'
        drops are interpolated from it; the windows touching the top `fast_fraction` of the
        map so estimated are then run exactly. Where every window covering a pixel ran, the
        map is the exact one."""
        every = max(2, -(-(params.coarse_stride or 2 * params.stride) // params.stride))
        coarse_rows = np.unique(np.append(np.arange(0, tops.size, every), tops.size - 1))
        coarse_columns = np.unique(np.append(np.arange(0, lefts.size, every), lefts.size - 1))
        measured = np.zeros((tops.size, lefts.size), dtype=bool)
        measured[np.ix_(coarse_rows, coarse_columns)] = True
        rows, columns = np.nonzero(measured)
        coarse = sweep.run(score_windows, tops[rows], lefts[columns])
        maps = coarse.shape[1]
        drops = np.empty((tops.size, lefts.size, maps))
        for index in range(maps):
            grid = coarse[:, index].reshape(coarse_rows.size, coarse_columns.size)
            across = np.stack([np.interp(lefts, lefts[coarse_columns], row) for row in grid])
            drops[:, :, index] = np.stack(
                [np.interp(tops, tops[coarse_rows], column) for column in across.T], axis=1
            )
        drops[rows, columns] = coarse
        grid_tops, grid_lefts = (a.ravel() for a in np.meshgrid(tops, lefts, indexing="ij"))
        estimate = averaged(drops.reshape(-1, maps), grid_tops, grid_lefts, params.window, *size)
        chosen = top_region(estimate, params.fast_fraction)
        wanted = windows_touching(chosen, grid_tops, grid_lefts, params.window).reshape(
            measured.shape
        )
        rows, columns = np.nonzero(wanted & ~measured)
        if rows.size:
            drops[rows, columns] = sweep.run(score_windows, tops[rows], lefts[columns])
        flat: np.ndarray = drops.reshape(-1, maps)
        return flat

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
        window = params.window
        if window > min(height, width):
            raise InvalidParameters(
                f"window {window} is larger than the model input {height}x{width}"
            )
        tops = window_starts(height, window, params.stride)
        lefts = window_starts(width, window, params.stride)
        passes = len(tops) * len(lefts)
        check_passes(
            passes, limits, params.max_passes, f"window {window} with stride {params.stride}"
        )
        grid = np.meshgrid(tops, lefts, indexing="ij")
        grid_tops, grid_lefts = grid[0].ravel(), grid[1].ravel()
        # Waiting requests hold no copies: at most `concurrent_jobs` run at once.
        with job_slot(limits.concurrent_jobs):
            probabilities, targets = clean_targets(model, tensor, targets, top_k)
            # The clean probabilities are already at hand; other scores need their own pass.
            if params.score == "probability":
                clean = probabilities[None][:, targets]
            elif params.score == "logit":
                clean = model.forward(tensor)[:, targets]
            else:
                clean = self.scorer(model, params)(tensor)
            batch = copies_per_run(model, tensor[0].nbytes, passes, limits)
            sweep = _Sweep(params, targets, clean, batch)
            score_windows, _ = self.window_scorer(model, tensor, params, batch, (tops, lefts))
            if params.mode == "fast":
                drops = self.drill_down(sweep, score_windows, params, tops, lefts, (height, width))
            else:
                drops = sweep.run(score_windows, grid_tops, grid_lefts)
            maps = averaged(drops, grid_tops, grid_lefts, window, height, width)
            if params.score == "feature_dip":
                maps_by_target = [TargetMap(t, maps[0]) for t in targets]
            else:
                maps_by_target = [TargetMap(t, m) for t, m in zip(targets, maps, strict=True)]
            return Explained(probabilities, maps_by_target, passes=sweep.done)

    @staticmethod
    def baseline(model: LoadedModel, tensor: np.ndarray, params: OcclusionParams) -> np.ndarray:
        return baseline_tensor(model, tensor, params.baseline, params.value)

    @staticmethod
    def scorer(model: LoadedModel, params: OcclusionParams) -> Scorer:
        if params.score != "feature_dip":
            return class_scorer(model, params.score)
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
