import struct
import zlib

import cv2
import numpy as np
import pytest

from engines.errors import ImageTooLarge, ImageTooSmall, InvalidImage, UnsupportedImage
from engines.imaging.decode import ImageLimits, decode_image, fit_to_input, read_header
from schemas.model_config import InputSpec
from tests.images import encode, solid

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1_000_000, min_side=8)


def gradient_image(height: int = 24, width: int = 40) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 5, ys * 7, (xs + ys) * 3], axis=-1).astype(np.uint8)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims the given size; the pixel data is absent."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk


@pytest.mark.parametrize(("ext", "fmt"), [(".png", "png"), (".jpg", "jpeg"), (".webp", "webp")])
def test_header_reports_format_and_size_of_each_format(ext: str, fmt: str) -> None:
    header = read_header(encode(gradient_image(), ext))
    assert (header.format, header.width, header.height) == (fmt, 40, 24)


def test_lossless_webp_header() -> None:
    data = encode(gradient_image(), ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    header = read_header(data)
    assert (header.width, header.height) == (40, 24)


def test_png_round_trips_exactly_as_rgb() -> None:
    image = gradient_image()
    np.testing.assert_array_equal(decode_image(encode(image), LIMITS), image)


def test_grayscale_rgba_and_16bit_pngs_decode_to_rgb8() -> None:
    gray = np.full((16, 16), 77, dtype=np.uint8)
    ok, gray_png = cv2.imencode(".png", gray)
    assert ok
    assert decode_image(bytes(gray_png), LIMITS)[0, 0].tolist() == [77, 77, 77]

    bgra = np.zeros((16, 16, 4), dtype=np.uint8)
    bgra[:] = (30, 20, 10, 128)
    ok, rgba_png = cv2.imencode(".png", bgra)
    assert ok
    assert decode_image(bytes(rgba_png), LIMITS)[0, 0].tolist() == [10, 20, 30]

    deep = np.full((16, 16, 3), 65535, dtype=np.uint16)
    ok, deep_png = cv2.imencode(".png", deep)
    assert ok
    decoded = decode_image(bytes(deep_png), LIMITS)
    assert decoded.dtype == np.uint8
    assert decoded[0, 0].tolist() == [255, 255, 255]


def test_empty_and_unknown_bytes_are_refused() -> None:
    with pytest.raises(InvalidImage):
        decode_image(b"", LIMITS)
    with pytest.raises(UnsupportedImage):
        decode_image(b"this is a text file pretending to be a png", LIMITS)
    with pytest.raises(UnsupportedImage):
        decode_image(b"GIF89a" + b"\x00" * 64, LIMITS)


def test_truncated_jpeg_is_refused() -> None:
    data = encode(gradient_image(64, 64), ".jpg")
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], LIMITS)


def test_truncated_png_is_refused() -> None:
    data = encode(gradient_image(64, 64))
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], LIMITS)


def test_header_cut_short_is_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidImage):
        decode_image(b"\x89PNG\r\n\x1a\n\x00\x00", LIMITS)
    with pytest.raises(InvalidImage):
        decode_image(b"\xff\xd8\xff\xe0\x00", LIMITS)


def test_decompression_bomb_is_refused_from_the_header_alone() -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(png_with_header(100_000, 100_000), LIMITS)


def test_png_whose_header_lies_about_its_size_is_refused() -> None:
    real = encode(gradient_image(16, 16))
    lying = bytearray(real)
    lying[16:24] = struct.pack(">II", 32, 32)
    with pytest.raises(InvalidImage):
        decode_image(bytes(lying), LIMITS)


def test_tiny_image_is_refused() -> None:
    with pytest.raises(ImageTooSmall):
        decode_image(encode(solid((1, 2, 3), 1, 1)), LIMITS)


def test_encoded_size_limit() -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(encode(gradient_image()), ImageLimits(max_bytes=64))


def test_center_crop_keeps_the_middle() -> None:
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 50:150] = 255  # the centre square is white, the sides black
    spec = InputSpec(height=50, width=50, resize="center_crop", crop_fraction=1.0)
    cropped = fit_to_input(image, spec)
    assert cropped.shape == (50, 50, 3)
    assert cropped.min() == 255


def test_resize_stretches_to_the_input_size() -> None:
    spec = InputSpec(height=20, width=30, resize="resize")
    assert fit_to_input(gradient_image(), spec).shape == (20, 30, 3)
