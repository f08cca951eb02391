"""What the explain route and `onnx-explain explain --local` share: limits taken from the
settings, target resolution, rendering and the response, so the two answer alike."""

from collections.abc import Sequence

import numpy as np

from engines.imaging.decode import ImageLimits, fit_to_input
from engines.methods.metrics import faithfulness
from engines.methods.pipeline import Explained, WorkLimits
from engines.models.loaded import LoadedModel
from engines.runtime import progress
from schemas.explain import (
    ExplainMethod,
    ExplainResponse,
    Explanation,
    Faithfulness,
    MetricName,
    OutputOptions,
)
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


def measure_faithfulness(
    model: LoadedModel,
    image: np.ndarray,
    explained: Explained,
    kinds: Sequence[MetricName],
    steps: int,
    curves: bool,
    limits: WorkLimits,
) -> list[Faithfulness]:
    """Each map's deletion and insertion scores; progress is reported per metric as a stage."""
    pixels = fit_to_input(image, model.config.input)
    measured = []
    for target_map in explained.maps:
        found = {}
        for kind in kinds:
            with progress.stage(kind):
                found.update(
                    faithfulness(
                        model, pixels, target_map.heatmap, target_map.target, [kind], steps, limits
                    )
                )
        fields: dict[str, float | list[float]] = {}
        for kind, curve in found.items():
            fields[f"{kind}_auc"] = curve.auc
            if curves:
                fields[f"{kind}_curve"] = curve.scores.tolist()
        measured.append(Faithfulness.model_validate(fields))
    return measured


def render_explanations(
    explained: Explained,
    model: LoadedModel,
    image: np.ndarray,
    output: OutputOptions,
    metrics: Sequence[Faithfulness | None] | None = None,
) -> list[Explanation]:
    maps = [target_map.heatmap for target_map in explained.maps]
    rendered = render_maps(maps, image, model.config.input, output)
    measured = metrics or [None] * len(maps)
    return [
        Explanation(
            target=target_map.target,
            label=model.label(target_map.target),
            heatmap=payloads[0],
            heatmaps=payloads,
            metrics=scores,
        )
        for target_map, payloads, scores in zip(explained.maps, rendered, measured, strict=True)
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
