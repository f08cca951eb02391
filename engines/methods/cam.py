"""Class activation maps from a layer's activations A and the target's gradients G there.

Each variant overrides `combine(A, G) -> (h, w)`; the pipeline runs the gradient graph once for
all targets, rectifies and upsamples to the model's input size.
"""

from typing import ClassVar

import cv2
import numpy as np

from engines.errors import UnsupportedModel
from engines.graphs.prepared import GradientResult, GraphKey
from engines.methods.pipeline import (
    Explained,
    Explainer,
    TargetMap,
    WorkLimits,
    seeds_for,
    spatial_size,
    targets_or_top,
)
from engines.models.loaded import LoadedModel
from engines.runtime.blas import single_threaded_blas
from schemas.params import CamParams

EPSILON = 1e-7


def channels_first(tensor: np.ndarray, channel_axis: int) -> np.ndarray:
    """(batch, ...) tensors with channels on axis 1, from channels on `channel_axis` (1 or 3)."""
    return tensor if channel_axis == 1 else np.moveaxis(tensor, -1, 1)


def layer_gradients(
    model: LoadedModel, tensor: np.ndarray, targets: list[int] | None, top_k: int, layer: str
) -> GradientResult:
    key = GraphKey(layer=layer, wrt_input=False, guided=False, top_k_seeds=targets is None)
    seeds = None if targets is None else seeds_for(targets, model.num_classes)
    return model.gradients.run(key, model.input_name, tensor, seeds=seeds, top_k=top_k)


def rectified_map(model: LoadedModel, cam: np.ndarray) -> np.ndarray:
    """ReLU of an (h, w) class activation map, upsampled to the model's input size."""
    height, width = spatial_size(model)
    rectified = np.maximum(cam, 0.0).astype(np.float32)
    upsampled: np.ndarray = cv2.resize(rectified, (width, height), interpolation=cv2.INTER_LINEAR)
    return upsampled


def resolve_layer(model: LoadedModel, params: CamParams) -> str:
    layer = params.layer or model.default_layer
    if layer is None:
        raise UnsupportedModel("the model has no 4-D spatial layer to compute a CAM on")
    return layer


class CamExplainer(Explainer):
    params_model: ClassVar[type[CamParams]] = CamParams

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: CamParams,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        layer = model.layer(resolve_layer(model, params))
        result = layer_gradients(model, tensor, targets, top_k, layer.name)
        assert result.activation is not None
        assert result.grad_layer is not None
        activations = channels_first(result.activation, layer.channel_axis)[0]
        gradients = channels_first(result.grad_layer, layer.channel_axis)
        features = activations.astype(np.float64)
        maps = [
            TargetMap(int(target), rectified_map(model, self.combine(features, grad)))
            for target, grad in zip(result.targets.tolist(), gradients, strict=True)
        ]
        return Explained(model.to_probabilities(result.outputs)[0], maps)

    def combine(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        """(C, h, w) activations and gradients -> (h, w) map before the final ReLU."""
        weights = self.channel_weights(activations, gradients)
        combined: np.ndarray = np.tensordot(weights, activations, axes=1)
        return combined

    def channel_weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class GradCam(CamExplainer):
    def channel_weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        weights: np.ndarray = gradients.mean(axis=(1, 2))
        return weights


class GradCamPlusPlus(CamExplainer):
    """Second- and third-order terms of exp(score), as in Chattopadhay et al. 2018."""

    def channel_weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        grads2 = gradients**2
        grads3 = grads2 * gradients
        activation_sums = activations.sum(axis=(1, 2))[:, None, None]
        denominator = 2 * grads2 + activation_sums * grads3
        alphas = np.where(gradients != 0, grads2 / (denominator + EPSILON), 0.0)
        weights: np.ndarray = (alphas * np.maximum(gradients, 0)).sum(axis=(1, 2))
        return weights


class XGradCam(CamExplainer):
    def channel_weights(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        sums = activations.sum(axis=(1, 2))
        weights: np.ndarray = (gradients * activations).sum(axis=(1, 2)) / (sums + EPSILON)
        return weights


class LayerCam(CamExplainer):
    def combine(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        combined: np.ndarray = (np.maximum(gradients, 0) * activations).sum(axis=0)
        return combined


class HiResCam(CamExplainer):
    def combine(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        combined: np.ndarray = (gradients * activations).sum(axis=0)
        return combined


def first_component(features: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w): each position's projection on the first principal component of the
    channel vectors (positions centred), signed so that its larger magnitude is positive.

    pytorch-grad-cam's Eigen-CAM keeps the SVD's arbitrary sign, which can leave nothing after
    the final ReLU; the sign fix is its own Seg-Eigen-CAM's (Chung and Ying 2025, Eq. 13).
    """
    channels = features.shape[0]
    positions = features.reshape(channels, -1).T.astype(np.float64)
    positions = positions - positions.mean(axis=0)
    # The top eigenvector of the smaller Gram matrix gives the SVD's first component: P v is
    # s u, with u the top eigenvector of P P^T and v that of P^T P (a 49x49 or CxC problem).
    with single_threaded_blas():
        if positions.shape[0] <= channels:
            values, vectors = np.linalg.eigh(positions @ positions.T)
            flat = vectors[:, -1] * np.sqrt(max(float(values[-1]), 0.0))
        else:
            _, vectors = np.linalg.eigh(positions.T @ positions)
            flat = positions @ vectors[:, -1]
    projection: np.ndarray = flat.reshape(features.shape[1:])
    if abs(projection.min()) > abs(projection.max()):
        projection = -projection
    return projection


class EigenGradCam(CamExplainer):
    def combine(self, activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        return first_component(activations * gradients)


class EigenCam(Explainer):
    """The first principal component of the layer's activations: no gradient, no target, so
    every target gets the same map."""

    params_model: ClassVar[type[CamParams]] = CamParams

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: CamParams,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        layer = model.layer(resolve_layer(model, params))
        values, outputs = model.intermediates(tensor, (layer.name, model.output_name))
        probabilities = model.to_probabilities(outputs.reshape(1, -1))[0]
        chosen = targets_or_top(model, probabilities, targets, top_k)
        activations = channels_first(values, layer.channel_axis)
        heatmap = rectified_map(model, first_component(activations[0]))
        return Explained(probabilities, [TargetMap(t, heatmap) for t in chosen])
