"""Class activation maps whose channel weights come from forward passes, one per channel.

Score-CAM (Wang et al. 2020) masks the input with each channel of the layer, upsampled and
min-max normalised, and weights the channel by the softmax over channels of the target's
score. Ablation-CAM (Desai and Ramaswamy 2020) zeroes one channel at a time and weights it by
the target's relative score drop; only the part of the network after the layer runs again.
Both are batched inference sharing occlusion's machinery: job slots, batches sized from the
memory budget, `max_passes`, the deadline of every run, and progress after each batch.
Neither needs gradients, so they explain models whose graphs cannot be differentiated.
"""

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from engines.methods.cam import channels_first, rectified_map, resolve_layer
from engines.methods.occlusion import batch_size, job_slot
from engines.methods.pipeline import (
    Explained,
    Explainer,
    TargetMap,
    WorkLimits,
    check_passes,
    spatial_size,
    targets_or_top,
)
from engines.models.layers import LayerInfo
from engines.models.loaded import LoadedModel, softmax
from engines.runtime import progress
from engines.runtime.blas import single_threaded_blas
from schemas.params import ForwardCamParams

NORMALISE_EPSILON = 1e-8

ChannelScorer = Callable[[np.ndarray], np.ndarray]
"""Channel indices (B,) -> the raw outputs (B, classes) of their passes."""


def interpolation_matrix(size_out: int, size_in: int) -> np.ndarray:
    """(out, in) weights of linear interpolation with corners aligned (torch's
    UpsamplingBilinear2d, which pytorch-grad-cam's Score-CAM upsamples with)."""
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    if size_in == 1 or size_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    source = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    low = np.minimum(np.floor(source).astype(np.int64), size_in - 2)
    fraction = source - low
    rows = np.arange(size_out)
    matrix[rows, low] = 1.0 - fraction
    matrix[rows, low + 1] += fraction
    return matrix


class ForwardCam(Explainer):
    params_model: ClassVar[type[ForwardCamParams]] = ForwardCamParams

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: ForwardCamParams,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        layer = model.layer(resolve_layer(model, params))
        declared = layer.shape[layer.channel_axis]
        if isinstance(declared, int):
            self.check_channels(layer, declared, limits, params)
        with job_slot(limits.concurrent_jobs):
            context = self.prepare(model, tensor, layer)
            activation, outputs = context[0], context[1]
            passes = activation.shape[layer.channel_axis]
            self.check_channels(layer, passes, limits, params)
            probabilities = model.to_probabilities(outputs.reshape(1, -1))[0]
            chosen = targets_or_top(model, probabilities, targets, top_k)
            clean = outputs.reshape(-1)[chosen].astype(np.float64)
            batch = self.batch(model, tensor, layer, activation, limits)
            score = self.scorer(model, tensor, layer, context, batch)
            scores = np.empty((passes, len(chosen)), dtype=np.float64)
            for start in range(0, passes, batch):
                channels = np.arange(start, min(start + batch, passes))
                scores[channels] = score(channels)[:, chosen]
                progress.report(int(channels[-1]) + 1, passes)
        features = channels_first(activation, layer.channel_axis)[0].astype(np.float64)
        weights = self.channel_weights(scores, clean)  # (targets, channels)
        with single_threaded_blas():
            cams = np.tensordot(weights, features, axes=1)
        maps = [
            TargetMap(t, rectified_map(model, cam)) for t, cam in zip(chosen, cams, strict=True)
        ]
        return Explained(probabilities, maps)

    @staticmethod
    def check_channels(
        layer: LayerInfo, channels: int, limits: WorkLimits, params: ForwardCamParams
    ) -> None:
        """One pass a channel, before the clean run when the graph declares the channels."""
        what = f"layer {layer.name!r} with {channels} channels (one pass each)"
        check_passes(channels, limits, params.max_passes, what)

    def prepare(self, model: LoadedModel, tensor: np.ndarray, layer: LayerInfo) -> list[np.ndarray]:
        """The clean run: the layer's activation, the raw output, and what the passes need."""
        return model.intermediates(tensor, (layer.name, model.output_name))

    def batch(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        layer: LayerInfo,
        activation: np.ndarray,
        limits: WorkLimits,
    ) -> int:
        raise NotImplementedError

    def scorer(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        layer: LayerInfo,
        context: list[np.ndarray],
        batch: int,
    ) -> ChannelScorer:
        """Scores the passes of at most `batch` channels at a time, in buffers made once."""
        raise NotImplementedError

    def channel_weights(self, scores: np.ndarray, clean: np.ndarray) -> np.ndarray:
        """(channels, targets) scores and the clean (targets,) ones -> (targets, channels)."""
        raise NotImplementedError


class ScoreCam(ForwardCam):
    def batch(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        layer: LayerInfo,
        activation: np.ndarray,
        limits: WorkLimits,
    ) -> int:
        most = batch_size(tensor[0].nbytes, limits.memory_budget_bytes)
        return model.rows_per_run(most, model.activation_bytes)

    def scorer(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        layer: LayerInfo,
        context: list[np.ndarray],
        batch: int,
    ) -> ChannelScorer:
        features = channels_first(context[0], layer.channel_axis)[0].astype(np.float32)
        height, width = spatial_size(model)
        rows = interpolation_matrix(height, features.shape[1]).astype(np.float32)
        columns = interpolation_matrix(width, features.shape[2]).astype(np.float32)
        copies = np.empty((batch, *tensor.shape[1:]), dtype=np.float32)

        def score(channels: np.ndarray) -> np.ndarray:
            with single_threaded_blas():
                masks = rows @ features[channels] @ columns.T  # (B, H, W)
            flat = masks.reshape(channels.size, -1)
            low = flat.min(axis=1)[:, None, None]
            span = flat.max(axis=1)[:, None, None] - low + NORMALISE_EPSILON
            masks -= low
            masks /= span
            chunk = copies[: channels.size]
            np.multiply(tensor, np.expand_dims(masks, model.channel_axis), out=chunk)
            return model.forward_batch(chunk)

        return score

    def channel_weights(self, scores: np.ndarray, clean: np.ndarray) -> np.ndarray:
        return softmax(scores.T)


class AblationCam(ForwardCam):
    def prepare(self, model: LoadedModel, tensor: np.ndarray, layer: LayerInfo) -> list[np.ndarray]:
        boundary = model.suffix(layer.name).boundary
        return model.intermediates(tensor, (layer.name, model.output_name, *boundary))

    def batch(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        layer: LayerInfo,
        activation: np.ndarray,
        limits: WorkLimits,
    ) -> int:
        most = batch_size(activation[0].nbytes, limits.memory_budget_bytes)
        return model.rows_per_run(most, model.suffix(layer.name).activation_bytes)

    def scorer(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        layer: LayerInfo,
        context: list[np.ndarray],
        batch: int,
    ) -> ChannelScorer:
        activation, boundary = context[0], context[2:]
        copies = np.repeat(activation, batch, axis=0)
        # Channels first, as views: each pass restores the channels the last one zeroed.
        clean = np.moveaxis(activation, layer.channel_axis, 1)[0]
        view = np.moveaxis(copies, layer.channel_axis, 1)
        zeroed = np.empty(0, dtype=np.int64)

        def score(channels: np.ndarray) -> np.ndarray:
            nonlocal zeroed
            rows = np.arange(zeroed.size)
            view[rows, zeroed] = clean[zeroed]
            rows = np.arange(channels.size)
            view[rows, channels] = 0.0
            zeroed = channels
            return model.run_suffix(layer.name, copies[: channels.size], boundary)

        return score

    def channel_weights(self, scores: np.ndarray, clean: np.ndarray) -> np.ndarray:
        drops: np.ndarray = (clean - scores) / clean
        return drops.T
