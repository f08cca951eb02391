import base64

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter

from engines.render import minmax, resize_map
from schemas.explain import ExplainRequest, ExplainResponse
from schemas.heatmap import ArrayHeatmap, Heatmap, PngHeatmap
from service.heatmaps import heatmap_payload

HEATMAP = np.linspace(-2.0, 6.0, 12 * 20, dtype=np.float32).reshape(12, 20)


def test_array_payload_round_trips_exactly() -> None:
    payload = heatmap_payload(HEATMAP, "array")
    assert isinstance(payload, ArrayHeatmap)
    assert payload.shape == (12, 20)
    assert payload.dtype == "float32"
    decoded = np.frombuffer(base64.b64decode(payload.data), dtype="<f4").reshape(payload.shape)
    np.testing.assert_array_equal(decoded, HEATMAP)


def test_png_payload_is_8bit_gray_minmax_scaled() -> None:
    payload = heatmap_payload(HEATMAP, "png")
    assert isinstance(payload, PngHeatmap)
    pixels = cv2.imdecode(
        np.frombuffer(base64.b64decode(payload.data), np.uint8), cv2.IMREAD_UNCHANGED
    )
    assert pixels is not None
    assert pixels.dtype == np.uint8
    assert pixels.shape == (12, 20)
    assert (pixels.min(), pixels.max()) == (0, 255)
    np.testing.assert_allclose(pixels / 255.0, minmax(HEATMAP), atol=0.5 / 255 + 1e-6)


def test_constant_map_is_all_zeros_not_nan() -> None:
    assert not minmax(np.full((4, 4), 3.0)).any()


def test_payload_json_round_trips_through_the_discriminated_union() -> None:
    adapter: TypeAdapter[PngHeatmap | ArrayHeatmap] = TypeAdapter(Heatmap)
    for fmt in ("png", "array"):
        payload = heatmap_payload(HEATMAP, fmt)
        assert adapter.validate_json(payload.model_dump_json()) == payload


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
    response = ExplainResponse.model_validate(
        {
            "model": "m",
            "method": "gradcam",
            "predictions": [{"index": 1, "label": "a", "score": 0.5}],
            "explanations": [
                {"target": 1, "label": "a", "heatmap": heatmap_payload(HEATMAP, "array")}
            ],
            "timings_ms": {"total": 1.0},
        }
    )
    assert isinstance(response.explanations[0].heatmap, ArrayHeatmap)
