"""engines.imaging.render: normalisation, geometry, colormaps, overlay, encoders on known maps."""

import cv2
import numpy as np
import pytest

from engines.errors import InvalidParameters
from engines.imaging import render
from schemas.heatmap import ColormapName
from schemas.model_config import InputSpec

SIGNED = np.array([[-4.0, -2.0, 0.0, 2.0, 4.0]], dtype=np.float32)
CROP = InputSpec(height=50, width=50, resize="center_crop", crop_fraction=1.0)


def test_minmax_maps_min_to_0_and_max_to_1() -> None:
    normalized = render.normalize(np.array([[2.0, 4.0, 10.0]], np.float32), "minmax")
    np.testing.assert_array_equal(normalized.values, [[0.0, 0.25, 1.0]])
    assert normalized.source_range == (2.0, 10.0)


def test_signed_keeps_zero_in_the_middle() -> None:
    normalized = render.normalize(SIGNED, "signed")
    np.testing.assert_array_equal(normalized.values, [[0.0, 0.25, 0.5, 0.75, 1.0]])
    assert normalized.source_range == (-4.0, 4.0)
    lopsided = render.normalize(np.array([[0.0, 1.0, 8.0]], np.float32), "signed").values
    np.testing.assert_array_equal(lopsided, [[0.5, 0.5625, 1.0]])
    assert (render.normalize(np.zeros((3, 3)), "signed").values == 0.5).all()


def test_percentile_clips_the_top_then_scales() -> None:
    heatmap = np.arange(100, dtype=np.float32).reshape(10, 10)
    heatmap[9, 9] = 10_000.0  # one hot pixel that would flatten a min-max map
    clipped = render.normalize(heatmap, "percentile", 90.0)
    high = float(np.percentile(heatmap, 90.0))
    assert clipped.source_range == (0.0, high)
    np.testing.assert_allclose(clipped.values, np.clip(heatmap / high, 0, 1), rtol=1e-6)
    assert (clipped.values == 1.0).sum() == (heatmap >= high).sum() >= 10
    assert render.normalize(heatmap, "minmax").values[:9].max() < 0.01
    full = render.normalize(heatmap, "percentile", 100.0).values
    np.testing.assert_array_equal(full, render.normalize(heatmap, "minmax").values)


def test_percentile_of_a_sparse_map_marks_the_peaks() -> None:
    sparse = np.zeros((10, 10), dtype=np.float32)
    sparse[2, 3] = 5.0
    values = render.normalize(sparse, "percentile", 50.0).values
    assert values[2, 3] == 1.0
    assert values.sum() == 1.0


def test_none_keeps_raw_values_and_constant_maps_do_not_divide_by_zero() -> None:
    raw = render.normalize(SIGNED, "none")
    np.testing.assert_array_equal(raw.values, SIGNED)
    assert raw.source_range is None
    assert not render.minmax(np.full((4, 4), 3.0)).any()
    assert render.normalize(np.full((2, 2), np.nan), "minmax").source_range is None


def test_quantisation_rounds_to_the_nearest_level() -> None:
    unit = render.normalize(SIGNED, "signed").values
    np.testing.assert_array_equal(render.to_gray8(unit), [[0, 64, 128, 191, 255]])
    np.testing.assert_array_equal(render.to_gray16(unit), [[0, 16384, 32768, 49151, 65535]])


@pytest.mark.parametrize("name", ["jet", "turbo", "viridis", "inferno"])
def test_colormaps_are_opencvs(name: ColormapName) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = cv2.applyColorMap(gray, getattr(cv2, f"COLORMAP_{name.upper()}"))
    np.testing.assert_array_equal(render.colorize(gray, name), expected)


def test_gray_colormap_replicates_the_map() -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    colored = render.colorize(gray, "gray")
    assert colored.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(colored[..., channel], gray)


def test_overlay_is_add_weighted_on_the_bgr_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    colored = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    expected = cv2.addWeighted(colored, 0.3, image[..., ::-1].copy(), 0.7, 0.0)
    np.testing.assert_array_equal(render.overlay(colored, image, 0.3), expected)
    with pytest.raises(ValueError, match="differ"):
        render.overlay(colored, image[:4], 0.3)


def test_float_encoders_are_little_endian() -> None:
    assert render.encode_floats(SIGNED) == SIGNED.astype("<f4").tobytes()
    assert render.encode_floats(SIGNED, "float16") == SIGNED.astype("<f2").tobytes()
    with pytest.raises(InvalidParameters, match="float16"):
        render.encode_floats(np.array([[1e6]], np.float32), "float16")


def test_model_size_is_the_model_input() -> None:
    geometry = render.output_geometry(100, 200, CROP, "model")
    assert (geometry.height, geometry.width) == (50, 50)
    assert render.place_map(np.ones((50, 50)), geometry).all()
    image = np.zeros((100, 200, 3), np.uint8)
    assert render.base_image(image, CROP, "model").shape == (50, 50, 3)


def test_input_size_puts_the_crop_where_it_lies_in_the_image() -> None:
    geometry = render.output_geometry(100, 200, CROP, "input")
    placed = render.place_map(np.ones((50, 50)), geometry)
    assert placed.shape == (100, 200)
    assert placed[:, 50:150].all()
    assert not placed[:, :50].any()
    assert not placed[:, 150:].any()


def test_explicit_size_scales_the_image_geometry() -> None:
    geometry = render.output_geometry(100, 200, CROP, (50, 100))
    placed = render.place_map(np.ones((50, 50)), geometry)
    assert placed.shape == (50, 100)
    assert placed[:, 25:75].all()
    assert not placed[:, :25].any()
    assert not placed[:, 75:].any()
    image = np.zeros((100, 200, 3), np.uint8)
    assert render.base_image(image, CROP, (50, 100)).shape == (50, 100, 3)
    assert render.base_image(image, CROP, (300, 400)).shape == (300, 400, 3)
