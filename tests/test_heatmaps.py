import base64
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from engines.imaging.render import normalize, resize_map
from schemas.explain import ExplainRequest, ExplainResponse, OutputOptions
from schemas.heatmap import (
    MAX_JSON_VALUES,
    ArrayHeatmap,
    ColormapHeatmap,
    ColormapName,
    Heatmap,
    HeatmapFormat,
    HeatmapPayload,
    JsonHeatmap,
    Normalization,
    OverlayHeatmap,
    Png16Heatmap,
    PngHeatmap,
)
from service.errors import InvalidRequest
from service.heatmaps import heatmap_payload, heatmap_payloads

# Known values: -2 .. 6 in 240 steps, so min-max is (v + 2) / 8 and signed is (v / 6 + 1) / 2.
HEATMAP = np.linspace(-2.0, 6.0, 12 * 20, dtype=np.float32).reshape(12, 20)
PERCENTILE = 90.0
CLIP = float(np.percentile(HEATMAP.astype(np.float64), PERCENTILE))
EXPECTED: dict[Normalization, np.ndarray] = {
    "minmax": (HEATMAP.astype(np.float64) + 2) / 8,
    "percentile": np.clip((HEATMAP.astype(np.float64) + 2) / (CLIP + 2), 0, 1),
    "signed": (HEATMAP.astype(np.float64) / 6 + 1) / 2,
    "none": HEATMAP.astype(np.float64),
}
SOURCE_RANGE: dict[Normalization, tuple[float, float] | None] = {
    "minmax": (-2.0, 6.0),
    "percentile": (-2.0, CLIP),
    "signed": (-6.0, 6.0),
    "none": None,
}
IMAGE = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
NORMALIZATIONS: list[Normalization] = ["minmax", "percentile", "signed"]
FORMATS: list[HeatmapFormat] = ["png", "png16", "colormap", "overlay", "array", "json"]


def decode_png(payload: HeatmapPayload) -> np.ndarray:
    assert isinstance(payload, PngHeatmap | Png16Heatmap | ColormapHeatmap | OverlayHeatmap)
    raw = base64.b64decode(payload.data)
    pixels = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None
    return pixels


def png_header(payload: HeatmapPayload) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk: type 0 is gray, 2 is RGB."""
    assert isinstance(payload, PngHeatmap | Png16Heatmap | ColormapHeatmap | OverlayHeatmap)
    raw = base64.b64decode(payload.data)
    return raw[24], raw[25]


def decode_array(payload: HeatmapPayload) -> np.ndarray:
    assert isinstance(payload, ArrayHeatmap)
    dtype = "<f4" if payload.dtype == "float32" else "<f2"
    return np.frombuffer(base64.b64decode(payload.data), dtype).reshape(payload.shape)


def payload(fmt: HeatmapFormat, **options: Any) -> HeatmapPayload:
    if options.get("normalize") == "percentile":
        options.setdefault("percentile", PERCENTILE)
    return heatmap_payload(HEATMAP, fmt, IMAGE, **options)


@pytest.mark.parametrize("method", NORMALIZATIONS)
def test_png_is_8bit_gray_within_1_255(method: Normalization) -> None:
    result = payload("png", normalize=method)
    assert isinstance(result, PngHeatmap)
    assert result.normalize == method
    assert result.source_range == pytest.approx(SOURCE_RANGE[method])
    assert png_header(result) == (8, 0)
    pixels = decode_png(result)
    assert (str(pixels.dtype), pixels.shape) == ("uint8", (12, 20))
    np.testing.assert_allclose(pixels / 255.0, EXPECTED[method], atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("method", NORMALIZATIONS)
def test_png16_is_16bit_gray_within_1_65535(method: Normalization) -> None:
    result = payload("png16", normalize=method)
    assert isinstance(result, Png16Heatmap)
    assert (result.normalize, result.max_value) == (method, 65535)
    assert result.source_range == pytest.approx(SOURCE_RANGE[method])
    assert png_header(result) == (16, 0)
    pixels = decode_png(result)
    assert (str(pixels.dtype), pixels.shape) == ("uint16", (12, 20))
    np.testing.assert_allclose(pixels / 65535.0, EXPECTED[method], atol=0.5 / 65535 + 1e-6)


@pytest.mark.parametrize("method", [*NORMALIZATIONS, "none"])
def test_float32_array_is_exact(method: Normalization) -> None:
    result = payload("array", normalize=method)
    assert isinstance(result, ArrayHeatmap)
    assert (result.dtype, result.shape, result.normalize) == ("float32", (12, 20), method)
    decoded = decode_array(result)
    engine = normalize(HEATMAP, method, PERCENTILE).values
    np.testing.assert_array_equal(decoded, engine)
    np.testing.assert_allclose(decoded, EXPECTED[method], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", [*NORMALIZATIONS, "none"])
def test_float16_array_keeps_float16_precision(method: Normalization) -> None:
    result = payload("array", normalize=method, dtype="float16")
    assert isinstance(result, ArrayHeatmap)
    assert result.dtype == "float16"
    decoded = decode_array(result)
    assert decoded.dtype == np.float16
    engine = normalize(HEATMAP, method, PERCENTILE).values
    np.testing.assert_array_equal(decoded, engine.astype(np.float16))
    # Round to nearest: half an ulp, 2**-11 relative, and float16's subnormal floor near 0.
    np.testing.assert_allclose(decoded, EXPECTED[method], rtol=2**-11, atol=2**-24)


@pytest.mark.parametrize("method", [*NORMALIZATIONS, "none"])
def test_json_gives_the_exact_float32_values(method: Normalization) -> None:
    result = payload("json", normalize=method)
    assert isinstance(result, JsonHeatmap)
    assert (result.shape, result.normalize) == ((12, 20), method)
    wire = TypeAdapter(Heatmap).validate_json(result.model_dump_json())
    assert isinstance(wire, JsonHeatmap)
    decoded = np.array(wire.values, dtype=np.float32)
    np.testing.assert_array_equal(decoded, normalize(HEATMAP, method, PERCENTILE).values)
    np.testing.assert_allclose(decoded, EXPECTED[method], rtol=1e-6, atol=1e-6)


def test_signed_puts_zero_at_the_middle_of_every_format() -> None:
    zero_centred = np.array([[-4.0, 0.0, 2.0, 4.0]], dtype=np.float32)
    pngs = heatmap_payloads(
        zero_centred, OutputOptions(format=["png", "png16", "json"], normalize="signed")
    )
    assert decode_png(pngs[0])[0, 1] == 128  # 127.5 rounds to even
    assert decode_png(pngs[1])[0, 1] == 32768
    assert isinstance(pngs[2], JsonHeatmap)
    assert pngs[2].values == [[0.0, 0.5, 0.75, 1.0]]


def test_percentile_clips_the_top_of_the_map() -> None:
    result = payload("array", normalize="percentile")
    decoded = decode_array(result)
    top = HEATMAP >= CLIP
    assert 0.05 < top.mean() < 0.15
    assert (decoded[top] == 1.0).all()
    assert decoded[~top].max() < 1.0


@pytest.mark.parametrize("colormap", ["jet", "turbo", "viridis", "inferno", "gray"])
def test_colormap_png_is_rgb_from_opencv(colormap: ColormapName) -> None:
    result = payload("colormap", colormap=colormap)
    assert isinstance(result, ColormapHeatmap)
    assert (result.colormap, result.normalize) == (colormap, "minmax")
    assert png_header(result) == (8, 2)
    gray8 = decode_png(payload("png"))
    if colormap == "gray":
        expected = np.repeat(gray8[..., None], 3, axis=2)
    else:
        expected = cv2.applyColorMap(gray8, getattr(cv2, f"COLORMAP_{colormap.upper()}"))
    # cv2.imdecode hands the PNG's RGB back as BGR, as cv2.applyColorMap produces it.
    np.testing.assert_array_equal(decode_png(result), expected)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_overlay_is_add_weighted_of_the_image_and_the_colored_map(alpha: float) -> None:
    options = {"colormap": "turbo", "normalize": "signed"}
    result = payload("overlay", alpha=alpha, **options)
    assert isinstance(result, OverlayHeatmap)
    assert (result.alpha, result.colormap, result.normalize) == (alpha, "turbo", "signed")
    assert png_header(result) == (8, 2)
    colored = decode_png(payload("colormap", **options))
    image_bgr = cv2.cvtColor(IMAGE, cv2.COLOR_RGB2BGR)
    expected = cv2.addWeighted(colored, alpha, image_bgr, 1.0 - alpha, 0.0)
    np.testing.assert_array_equal(decode_png(result), expected)


def test_several_formats_come_back_in_request_order() -> None:
    formats: list[HeatmapFormat] = ["json", "overlay", "array", "png16", "png", "colormap"]
    options = OutputOptions(format=formats, dtype="float16", colormap="viridis")
    results = heatmap_payloads(HEATMAP, options, IMAGE)
    assert [r.format for r in results] == formats
    assert results[4] == payload("png")
    assert results[2] == payload("array", dtype="float16")


def test_json_refuses_maps_over_the_limit() -> None:
    side = int(np.sqrt(MAX_JSON_VALUES)) + 1
    with pytest.raises(InvalidRequest, match=str(MAX_JSON_VALUES)):
        heatmap_payload(np.zeros((side, side), np.float32), "json")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"format": "png", "normalize": "none"}, "none"),
        ({"format": ["array", "overlay"], "normalize": "none"}, "overlay"),
        ({"format": ["png", "png"]}, "distinct"),
        ({"format": ["png", "png16", "colormap", "overlay", "array", "json", "png"]}, "at most 6"),
        ({"format": []}, "at least 1"),
        ({"size": [0, 10]}, "size"),
        ({"size": [10, 4097]}, "size"),
        ({"size": "huge"}, "size"),
        ({"percentile": 0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"alpha": 1.5}, "alpha"),
        ({"colormap": "rainbow"}, "colormap"),
        ({"dtype": "float64"}, "dtype"),
        ({"format": "png", "extra": 1}, "extra"),
    ],
)
def test_output_options_are_bounded(output: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OutputOptions.model_validate(output)


def test_output_options_defaults_and_accepted_forms() -> None:
    default = OutputOptions()
    assert (default.formats, default.size, default.normalize) == (["png"], "input", "minmax")
    assert (default.percentile, default.colormap, default.alpha) == (99.0, "jet", 0.5)
    assert OutputOptions.model_validate({"size": [3, 4096]}).size == (3, 4096)
    assert OutputOptions.model_validate({"format": ["array", "json"], "normalize": "none"})


def test_every_payload_round_trips_through_the_discriminated_union() -> None:
    adapter: TypeAdapter[HeatmapPayload] = TypeAdapter(Heatmap)
    for fmt in FORMATS:
        result = payload(fmt)
        assert adapter.validate_json(result.model_dump_json()) == result


def test_resize_map_reaches_the_requested_size() -> None:
    assert resize_map(HEATMAP, 30, 50).shape == (30, 50)


def test_explain_envelopes_bound_their_fields() -> None:
    request = ExplainRequest.model_validate(
        {"image": "aGk=", "method": "gradcam", "targets": [281, "tabby cat"], "params": {"x": 1}}
    )
    assert request.targets == [281, "tabby cat"]
    assert request.output.format == "png"
    with pytest.raises(ValueError, match="method"):
        ExplainRequest.model_validate({"image": "aGk=", "method": "magic"})
    with pytest.raises(ValueError, match="targets"):
        ExplainRequest.model_validate({"image": "aGk=", "method": "gradcam", "targets": [1] * 21})
    array = payload("array")
    response = ExplainResponse.model_validate(
        {
            "model": "m",
            "method": "gradcam",
            "predictions": [{"index": 1, "label": "a", "score": 0.5}],
            "explanations": [{"target": 1, "label": "a", "heatmap": array, "heatmaps": [array]}],
            "timings_ms": {"total": 1.0},
        }
    )
    assert isinstance(response.explanations[0].heatmap, ArrayHeatmap)
    with pytest.raises(ValidationError, match="heatmaps"):
        ExplainResponse.model_validate(
            {
                **response.model_dump(),
                "explanations": [{"target": 1, "label": "a", "heatmap": array}],
            }
        )
