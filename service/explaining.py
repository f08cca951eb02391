"""What the explain route and `onnx-explain explain --local` share: limits taken from the
settings, target resolution, rendering and the response, so the two answer alike."""

from collections.abc import Sequence

import numpy as np

from engines.imaging.decode import ImageLimits
from engines.methods.pipeline import Explained, WorkLimits
from engines.models.loaded import LoadedModel
from schemas.explain import ExplainMethod, ExplainResponse, Explanation, OutputOptions
from schemas.predict import Prediction
from service.heatmaps import render_maps
from service.settings import Settings


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
    )


def work_limits(settings: Settings) -> WorkLimits:
    return WorkLimits(
        max_passes=settings.max_passes,
        memory_budget_bytes=settings.occlusion_memory_budget_bytes,
        concurrent_jobs=settings.occlusion_jobs,
    )


def resolve_targets(model: LoadedModel, targets: Sequence[int | str] | None) -> list[int] | None:
    """Class indices for indices or labels, each once, in the order given (None: top-k)."""
    if targets is None:
        return None
    return list(dict.fromkeys(model.resolve_target(target) for target in targets))


def render_explanations(
    explained: Explained, model: LoadedModel, image: np.ndarray, output: OutputOptions
) -> list[Explanation]:
    maps = [target_map.heatmap for target_map in explained.maps]
    rendered = render_maps(maps, image, model.config.input, output)
    return [
        Explanation(
            target=target_map.target,
            label=model.label(target_map.target),
            heatmap=payloads[0],
            heatmaps=payloads,
        )
        for target_map, payloads in zip(explained.maps, rendered, strict=True)
    ]


def explain_response(
    name: str,
    method: ExplainMethod,
    model: LoadedModel,
    explained: Explained,
    explanations: list[Explanation],
    top_k: int,
    stages: tuple[float, float, float, float],
) -> ExplainResponse:
    """`stages`: perf_counter() at the start, after decoding, after explaining, at the end."""
    started, decoded, computed, finished = stages
    top = model.top_predictions(explained.probabilities, max(top_k, 5))
    return ExplainResponse(
        model=name,
        method=method,
        predictions=[Prediction(index=p.index, label=p.label, score=p.score) for p in top],
        explanations=explanations,
        timings_ms={
            "decode": _milliseconds(started, decoded),
            "explain": _milliseconds(decoded, computed),
            "render": _milliseconds(computed, finished),
            "total": _milliseconds(started, finished),
        },
        passes=explained.passes,
    )


def _milliseconds(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
