"""The shared explanation pipeline: tensor in, one map per target out, at model resolution.

Each method family subclasses `Explainer` and overrides one hook; the registry maps method
names to instances.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from engines.errors import TooMuchWork
from engines.imaging.decode import blur_tensor, preprocess
from engines.models.loaded import LoadedModel

BASELINE_PIXELS = {"black": 0, "grey": 128, "white": 255}


@dataclass(frozen=True)
class WorkLimits:
    """Bounds from the service's settings that a method must respect."""

    max_passes: int = 4096
    """Forward passes one request may cost (occlusion)."""
    memory_budget_bytes: int = 512 * 1024 * 1024
    """Memory for input copies and their activations in flight (sets occlusion's batch)."""
    concurrent_jobs: int = 2
    """Occlusion jobs holding their copies at once in the process; the others wait their
    turn, so memory stays near `concurrent_jobs` budgets however many requests arrive."""


@dataclass(frozen=True)
class TargetMap:
    target: int
    heatmap: np.ndarray
    """(H, W) at the model's input resolution."""


@dataclass(frozen=True)
class Explained:
    probabilities: np.ndarray
    """The model's class probabilities for the clean image, (classes,)."""
    maps: list[TargetMap]
    passes: int | None = None
    """The occluded or perturbed copies the method ran, for the methods that count them."""


class Explainer(ABC):
    params_model: ClassVar[type[BaseModel]]

    @abstractmethod
    def explain(
        self,
        model: LoadedModel,
        tensor: np.ndarray,
        targets: list[int] | None,
        top_k: int,
        params: Any,
        limits: WorkLimits = WorkLimits(),
    ) -> Explained:
        """`tensor` is one preprocessed image (batch of 1); `targets` None means the top-k."""


def seeds_for(targets: list[int], num_classes: int) -> np.ndarray:
    seeds = np.zeros((len(targets), num_classes), dtype=np.float32)
    seeds[np.arange(len(targets)), targets] = 1.0
    return seeds


def clean_targets(
    model: LoadedModel, tensor: np.ndarray, targets: list[int] | None, top_k: int
) -> tuple[np.ndarray, list[int]]:
    """Class probabilities of the clean image, and the targets (its top-k when none given)."""
    probabilities = model.to_probabilities(model.forward(tensor))[0]
    return probabilities, targets_or_top(model, probabilities, targets, top_k)


def targets_or_top(
    model: LoadedModel, probabilities: np.ndarray, targets: list[int] | None, top_k: int
) -> list[int]:
    """`targets`, or the top-k classes of `probabilities` when none are given."""
    if targets is None:
        return [p.index for p in model.top_predictions(probabilities, top_k)]
    return targets


def spatial_size(model: LoadedModel) -> tuple[int, int]:
    return model.config.input.height, model.config.input.width


def check_passes(passes: int, limits: WorkLimits, requested: int | None, what: str) -> None:
    """Refuse work of more passes than the settings, or the request itself, allow."""
    allowed = min(limits.max_passes, requested or limits.max_passes)
    if passes > allowed:
        raise TooMuchWork(f"{what} needs {passes} passes; the limit is {allowed}")


def class_scorer(model: LoadedModel, score: str) -> Callable[[np.ndarray], np.ndarray]:
    """A batch of input tensors -> (B, classes): `probability` or `logit`, as batch work."""
    if score == "probability":
        return lambda batch: model.to_probabilities(model.forward_batch(batch))
    return model.forward_batch


def baseline_tensor(
    model: LoadedModel, tensor: np.ndarray, kind: str, value: int = 128
) -> np.ndarray:
    """A reference input beside `tensor` (1, ...), broadcastable against it: `zeros` (the
    input tensor 0), `mean` (the image's mean colour), `blur` (a blurred copy), or a constant
    pixel value: `constant` (`value`), `black`, `grey`, `white`."""
    spec = model.config.input
    if kind == "zeros":
        return np.zeros_like(tensor)
    if kind == "mean":
        spatial = tuple(a for a in range(1, tensor.ndim) if a != model.channel_axis)
        mean: np.ndarray = tensor.mean(axis=spatial, keepdims=True)
        return mean
    if kind == "blur":
        return blur_tensor(tensor, model.channel_axis, max(spec.height, spec.width) / 20)
    pixel = BASELINE_PIXELS.get(kind, value)
    return preprocess([np.full((spec.height, spec.width, 3), pixel, dtype=np.uint8)], spec)
