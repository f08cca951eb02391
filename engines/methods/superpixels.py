"""LIME and KernelSHAP on superpixels, as Captum's `Lime` and `KernelShap` define them.

scikit-image segments the image (at model resolution) into superpixels; each sample switches
some of them off (their pixels show the baseline), and a weighted linear model of the target's
score on the samples' on/off vectors gives each superpixel a coefficient, painted on its
pixels. The two methods differ in one hook each: how samples are drawn and weighted.

- LIME: each superpixel kept with probability 1/2; a sample's weight is an exponential kernel
  on the cosine distance between the input and the perturbed copy (in input space); a Lasso
  (scikit-learn's, alpha 0.01) is fitted.
- KernelSHAP: the all-on and all-off samples first, then k superpixels on, with k drawn from
  p(k) ~ (M - 1) / (k (M - k)) and the k chosen uniformly: the Shapley kernel by sampling, so
  every other sample weighs 1; the two end samples weigh 1e6, which holds the efficiency
  constraint (the coefficients sum to f(all) - f(none)). An ordinary linear regression is
  fitted.
"""

from abc import abstractmethod
from typing import ClassVar, Generic, TypeVar

import numpy as np

from engines.errors import InvalidParameters
from engines.imaging.decode import to_pixels
from engines.methods.perturbation import score_masked_copies
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
from schemas.params import KernelShapParams, LimeParams, SuperpixelParams

P = TypeVar("P", bound=SuperpixelParams)

MAX_SUPERPIXELS = 500
END_SAMPLE_WEIGHT = 1e6  # Captum's weight on KernelSHAP's all-on and all-off samples


def segment(pixels: np.ndarray, params: SuperpixelParams) -> np.ndarray:
    """(H, W) superpixel labels 0 .. M - 1 of an RGB uint8 image."""
    from skimage.segmentation import quickshift, slic

    if params.segmentation == "slic":
        labels = slic(
            pixels,
            n_segments=params.segments,
            compactness=params.compactness,
            start_label=0,
            channel_axis=-1,
        )
    else:
        labels = quickshift(  # type: ignore[no-untyped-call]
            pixels,
            kernel_size=params.kernel_size,
            max_dist=params.max_dist,
            ratio=params.ratio,
            rng=params.seed,
            channel_axis=-1,
        )
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape)
    count = int(dense.max()) + 1
    if count < 2:
        raise InvalidParameters(
            f"{params.segmentation} found a single superpixel in this image: nothing to compare"
        )
    if count > MAX_SUPERPIXELS:
        raise InvalidParameters(
            f"{params.segmentation} cut the image into {count} superpixels; at most "
            f"{MAX_SUPERPIXELS} are fitted (fewer `segments`, or a larger `kernel_size` or "
            "`max_dist`)"
        )
    return dense


def planes(model: LoadedModel, tensor: np.ndarray) -> np.ndarray:
    """A (1, ...) tensor's (C, H, W) view, whatever the layout."""
    return np.moveaxis(tensor[0], model.channel_axis - 1, 0)


def superpixel_means(model: LoadedModel, tensor: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Each superpixel painted with its own mean colour, as a (1, ...) tensor."""
    flat = segments.ravel()
    counts = np.bincount(flat)
    painted = np.stack(
        [
            (np.bincount(flat, weights=plane.ravel()) / counts)[segments]
            for plane in planes(model, tensor)
        ]
    )
    return np.moveaxis(painted, 0, model.channel_axis - 1)[None].astype(np.float32)


class SuperpixelExplainer(Explainer, Generic[P]):
    method: ClassVar[str]

    @abstractmethod
    def samples(self, rng: np.random.Generator, count: int, features: int) -> np.ndarray:
        """(count, features) booleans: which superpixels each sample keeps."""

    @abstractmethod
    def weights(
        self,
        kept: np.ndarray,
        model: LoadedModel,
        tensor: np.ndarray,
        baseline: np.ndarray,
        segments: np.ndarray,
        params: P,
    ) -> np.ndarray:
        """(count,) sample weights of the linear fit."""

    @abstractmethod
    def fit(
        self, kept: np.ndarray, scores: np.ndarray, weights: np.ndarray, params: P
    ) -> np.ndarray:
        """(targets, features) coefficients of the weighted linear fit of scores (count, T)."""

    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: P,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        check_passes(
            params.samples,
            limits,
            params.max_passes,
            f"{self.method} with {params.samples} samples",
        )
        segments = segment(to_pixels(tensor, model.config.input), params)
        features = int(segments.max()) + 1
        probabilities, targets = clean_targets(model, tensor, targets, top_k)
        if params.baseline == "superpixel_mean":
            baseline = superpixel_means(model, tensor, segments)
        else:
            baseline = baseline_tensor(model, tensor, params.baseline, params.value)
        rng = np.random.default_rng(params.seed)
        kept = self.samples(rng, params.samples, features)
        on = kept.astype(np.float32)
        scores = np.empty((params.samples, len(targets)), dtype=np.float64)

        def masks(start: int, stop: int) -> np.ndarray:
            masked: np.ndarray = on[start:stop][:, segments]
            return masked

        def record(start: int, keep: np.ndarray, batch_scores: np.ndarray) -> None:
            scores[start : start + keep.shape[0]] = batch_scores[:, targets]

        score_masked_copies(
            model, tensor, baseline, params.samples, masks, record, params.score, limits
        )
        weights = self.weights(kept, model, tensor, baseline, segments, params)
        coefficients = self.fit(kept.astype(np.float64), scores, weights, params)
        return Explained(
            probabilities,
            [
                TargetMap(t, row[segments].astype(np.float32))
                for t, row in zip(targets, coefficients, strict=True)
            ],
        )


def linear_regression(kept: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LinearRegression

    fitted = LinearRegression().fit(kept, scores, sample_weight=weights)
    coefficients: np.ndarray = fitted.coef_.reshape(scores.shape[1], -1)
    return coefficients


class Lime(SuperpixelExplainer[LimeParams]):
    params_model: ClassVar[type[LimeParams]] = LimeParams
    method = "LIME"

    def samples(self, rng: np.random.Generator, count: int, features: int) -> np.ndarray:
        kept: np.ndarray = rng.random((count, features)) < 0.5
        return kept

    def weights(
        self,
        kept: np.ndarray,
        model: LoadedModel,
        tensor: np.ndarray,
        baseline: np.ndarray,
        segments: np.ndarray,
        params: LimeParams,
    ) -> np.ndarray:
        """exp(-d^2 / (2 width^2)) of the cosine distance d between input and copy.

        A copy is the input on kept superpixels and the baseline elsewhere, so its dot product
        with the input and its norm are sums of per-superpixel sums: no copy is rebuilt.
        """
        image = planes(model, tensor).astype(np.float64)
        hidden = planes(model, np.broadcast_to(baseline, tensor.shape)).astype(np.float64)
        flat = segments.ravel()

        def per_superpixel(values: np.ndarray) -> np.ndarray:
            return np.bincount(flat, weights=values.sum(axis=0).ravel())

        image_sq, hidden_sq = per_superpixel(image * image), per_superpixel(hidden * hidden)
        cross = per_superpixel(image * hidden)
        on = kept.astype(np.float64)
        off = 1.0 - on
        dot = on @ image_sq + off @ cross
        copy_norm = np.sqrt(on @ image_sq + off @ hidden_sq)
        image_norm = np.sqrt(image_sq.sum())
        eps = 1e-8  # torch's CosineSimilarity guard, which Captum's kernel goes through
        cosine = dot / (np.maximum(image_norm, eps) * np.maximum(copy_norm, eps))
        distance = 1.0 - cosine
        weights: np.ndarray = np.exp(-(distance**2) / (2 * params.kernel_width**2))
        return weights

    def fit(
        self, kept: np.ndarray, scores: np.ndarray, weights: np.ndarray, params: LimeParams
    ) -> np.ndarray:
        if params.alpha == 0:
            return linear_regression(kept, scores, weights)
        from sklearn.linear_model import Lasso

        fitted = Lasso(alpha=params.alpha).fit(kept, scores, sample_weight=weights)
        coefficients: np.ndarray = fitted.coef_.reshape(scores.shape[1], -1)
        return coefficients


class KernelShap(SuperpixelExplainer[KernelShapParams]):
    params_model: ClassVar[type[KernelShapParams]] = KernelShapParams
    method = "KernelSHAP"

    def samples(self, rng: np.random.Generator, count: int, features: int) -> np.ndarray:
        sizes = np.arange(1, features)
        chances = (features - 1) / (sizes * (features - sizes))
        drawn = rng.choice(sizes, size=count - 2, p=chances / chances.sum())
        # The first k of a random order of the superpixels: a uniform subset of k.
        order = np.argsort(rng.random((count - 2, features)), axis=1)
        kept = np.zeros((count, features), dtype=bool)
        kept[0] = True
        rows = np.arange(count - 2)[:, None]
        kept[2:][rows, order] = np.arange(features)[None, :] < drawn[:, None]
        return kept

    def weights(
        self,
        kept: np.ndarray,
        model: LoadedModel,
        tensor: np.ndarray,
        baseline: np.ndarray,
        segments: np.ndarray,
        params: KernelShapParams,
    ) -> np.ndarray:
        on = kept.sum(axis=1)
        ends = (on == 0) | (on == kept.shape[1])
        weights: np.ndarray = np.where(ends, END_SAMPLE_WEIGHT, 1.0)
        return weights

    def fit(
        self, kept: np.ndarray, scores: np.ndarray, weights: np.ndarray, params: KernelShapParams
    ) -> np.ndarray:
        return linear_regression(kept, scores, weights)
