"""Maps from the gradient of the class score with respect to the input pixels.

Each method overrides `attribute`, which returns per-target attributions shaped like the input
tensor; the pipeline reduces the channels and returns one map per target.
"""

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from engines.graphs.prepared import GraphKey
from engines.methods.cam import GradCam, channels_first
from engines.methods.pipeline import (
    Explained,
    Explainer,
    TargetMap,
    WorkLimits,
    baseline_tensor,
    clean_targets,
    seeds_for,
)
from engines.models.loaded import LoadedModel
from engines.runtime import progress
from schemas.params import (
    DeepLiftParams,
    GradientShapParams,
    GradientTimesInputParams,
    GuidedGradCamParams,
    IntegratedGradientsParams,
    Reduction,
    SaliencyParams,
    SmoothGradParams,
)

# Rows per onnxruntime run when a method pushes many perturbed copies through the model.
CHUNK_ROWS = 16


def reduce_channels(attribution: np.ndarray, reduction: Reduction) -> np.ndarray:
    """(C, H, W) -> (H, W)."""
    if reduction == "abs_max":
        result: np.ndarray = np.abs(attribution).max(axis=0)
    elif reduction == "max":
        result = attribution.max(axis=0)
    elif reduction == "sum":
        result = attribution.sum(axis=0)
    else:
        result = np.abs(attribution).sum(axis=0)
    return result.astype(np.float32)


class InputGradientExplainer(Explainer):
    params_model: ClassVar[type[BaseModel]] = SaliencyParams
    guided: ClassVar[bool] = False

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        probabilities, chosen, attributions = self.attribute(model, tensor, targets, top_k, params)
        maps = [
            TargetMap(target, reduce_channels(a, params.reduction))
            for target, a in zip(chosen, attributions, strict=True)
        ]
        return Explained(probabilities, maps)

    def attribute(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
    ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        """Probabilities, the targets, and one (C, H, W) attribution per target."""
        key = GraphKey(layer=None, wrt_input=True, guided=self.guided, top_k_seeds=targets is None)
        seeds = None if targets is None else seeds_for(targets, model.num_classes)
        result = model.gradients.run(key, model.input_name, tensor, seeds=seeds, top_k=top_k)
        assert result.grad_input is not None
        grads = channels_first(result.grad_input, model.channel_axis)
        probabilities = model.to_probabilities(result.outputs)[0]
        return probabilities, result.targets.tolist(), list(grads)


class Saliency(InputGradientExplainer):
    pass


class GuidedBackprop(InputGradientExplainer):
    guided = True


class GradientTimesInput(InputGradientExplainer):
    params_model = GradientTimesInputParams

    def attribute(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
    ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        probabilities, chosen, grads = super().attribute(model, tensor, targets, top_k, params)
        image = channels_first(tensor, model.channel_axis)[0]
        return probabilities, chosen, [g * image for g in grads]


def mean_input_gradient(
    model: LoadedModel,
    rows: np.ndarray,
    target: int,
    done: int = 0,
    all_rows: int = 0,
    row_weights: np.ndarray | None = None,
) -> np.ndarray:
    """The gradient of `target` at each row of `rows`, averaged, channels first (C, H, W).

    `row_weights` (shaped like `rows`) multiply each row's gradient before the mean.
    Progress counts rows: `done` of `all_rows` (default: just these rows) came before.
    """
    key = GraphKey(layer=None, wrt_input=True, guided=False, top_k_seeds=False)
    total: np.ndarray | None = None
    all_rows = all_rows or rows.shape[0]
    per_run = model.rows_per_run(
        progress.rows_per_report(CHUNK_ROWS, all_rows), model.gradients.activation_bytes
    )
    for start in range(0, rows.shape[0], per_run):
        chunk = rows[start : start + per_run]
        seeds = seeds_for([target] * chunk.shape[0], model.num_classes)
        run = model.gradients.run(key, model.input_name, chunk, seeds=seeds, batch_work=True)
        assert run.grad_input is not None
        grads = run.grad_input
        if row_weights is not None:
            grads = grads * row_weights[start : start + per_run]
        chunk_sum = grads.astype(np.float64).sum(axis=0)
        total = chunk_sum if total is None else total + chunk_sum
        progress.report(done + start + chunk.shape[0], all_rows)
    assert total is not None
    mean = total / rows.shape[0]
    averaged: np.ndarray = channels_first(mean[None], model.channel_axis)[0]
    return averaged


def mean_gradients(
    model: LoadedModel,
    rows: np.ndarray,
    targets: list[int],
    row_weights: np.ndarray | None = None,
) -> list[np.ndarray]:
    """`mean_input_gradient` for each target, with one progress count over all of them."""
    count = rows.shape[0]
    return [
        mean_input_gradient(model, rows, target, i * count, count * len(targets), row_weights)
        for i, target in enumerate(targets)
    ]


class SmoothGrad(InputGradientExplainer):
    params_model = SmoothGradParams

    def attribute(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
    ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        probabilities, chosen = clean_targets(model, tensor, targets, top_k)
        rng = np.random.default_rng(params.seed)
        sigma = params.noise * float(tensor.max() - tensor.min())
        noise = rng.normal(0.0, sigma, size=(params.samples, *tensor.shape[1:]))
        rows = (tensor + noise).astype(np.float32)
        return probabilities, chosen, mean_gradients(model, rows, chosen)


class IntegratedGradients(InputGradientExplainer):
    """Midpoint Riemann sum of the gradient along the straight path from a baseline."""

    params_model = IntegratedGradientsParams

    def attribute(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
    ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        probabilities, chosen = clean_targets(model, tensor, targets, top_k)
        baseline = baseline_tensor(model, tensor, params.baseline)
        alphas = (np.arange(params.steps, dtype=np.float32) + 0.5) / params.steps
        shape = (-1,) + (1,) * (tensor.ndim - 1)
        rows = (baseline + alphas.reshape(shape) * (tensor - baseline)).astype(np.float32)
        difference = channels_first(tensor - baseline, model.channel_axis)[0]
        grads = [g * difference for g in mean_gradients(model, rows, chosen)]
        return probabilities, chosen, grads


class DeepLift(InputGradientExplainer):
    """Captum's DeepLift (rescale rule): (x - baseline) times the gradient graph's multipliers,
    which rescale every nonlinearity by its output change over its input change."""

    params_model = DeepLiftParams

    def attribute(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
    ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        baseline = baseline_tensor(model, tensor, params.baseline).astype(np.float32)
        key = GraphKey(
            layer=None, wrt_input=True, guided=False, top_k_seeds=targets is None, deeplift=True
        )
        seeds = None if targets is None else seeds_for(targets, model.num_classes)
        result = model.gradients.run(
            key, model.input_name, tensor, seeds=seeds, top_k=top_k, reference=baseline
        )
        assert result.grad_input is not None
        products = channels_first(result.grad_input * (tensor - baseline), model.channel_axis)
        probabilities = model.to_probabilities(result.outputs)[0]
        return probabilities, result.targets.tolist(), list(products)


class GradientShap(InputGradientExplainer):
    """Captum's GradientShap: the mean over `samples` random points of
    (x' - baseline) * gradient at baseline + alpha * (x' - baseline), where x' is the input
    plus Gaussian noise of std `stdevs` and alpha is uniform in [0, 1)."""

    params_model = GradientShapParams

    def attribute(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
    ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
        probabilities, chosen = clean_targets(model, tensor, targets, top_k)
        baseline = baseline_tensor(model, tensor, params.baseline)
        alphas, noisy = gradient_shap_points(tensor, params.samples, params.stdevs, params.seed)
        differences = (noisy - baseline).astype(np.float32)
        shape = (-1,) + (1,) * (tensor.ndim - 1)
        rows = (baseline + alphas.reshape(shape) * differences).astype(np.float32)
        return probabilities, chosen, mean_gradients(model, rows, chosen, differences)


def gradient_shap_points(
    tensor: np.ndarray, samples: int, stdevs: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """GradientShap's random alphas (samples,) and noisy inputs (samples, ...) for `seed`."""
    rng = np.random.default_rng(seed)
    alphas = rng.uniform(0.0, 1.0, samples).astype(np.float32)
    noisy = np.repeat(tensor, samples, axis=0)
    if stdevs > 0:
        noisy = noisy + rng.normal(0.0, stdevs, size=noisy.shape).astype(np.float32)
    return alphas, noisy


class GuidedGradCam(Explainer):
    """Grad-CAM upsampled to the input, times the channel-wise max of |guided backprop|."""

    params_model = GuidedGradCamParams

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        cam = GradCam().explain(model, tensor, targets, top_k, params)
        chosen = [m.target for m in cam.maps]
        key = GraphKey(layer=None, wrt_input=True, guided=True, top_k_seeds=False)
        result = model.gradients.run(
            key, model.input_name, tensor, seeds=seeds_for(chosen, model.num_classes)
        )
        assert result.grad_input is not None
        guided = channels_first(result.grad_input, model.channel_axis)
        maps = [
            TargetMap(m.target, m.heatmap * reduce_channels(g, "abs_max"))
            for m, g in zip(cam.maps, guided, strict=True)
        ]
        return Explained(cam.probabilities, maps)
