"""The shared explanation pipeline: tensor in, one map per target out, at model resolution.

Each method family subclasses `Explainer` and overrides one hook; the registry maps method
names to instances.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from engines.models.loaded import LoadedModel


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
