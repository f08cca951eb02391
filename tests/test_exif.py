"""EXIF orientation: phone photos decode as viewers show them, whatever their Orientation tag."""

import io
import random
import struct
import zlib
from collections.abc import Callable

import cv2
import numpy as np
import pytest

from engines.errors import ImageTooLarge, ImageTooSmall
from engines.imaging.decode import ImageLimits, decode_image, read_header
from tests.images import encode

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1_000_000, min_side=8)
HEIGHT, WIDTH = 24, 40
TOP_LEFT, TOP_RIGHT = (220, 30, 30), (30, 200, 40)
BOTTOM_LEFT, BOTTOM_RIGHT = (40, 50, 210), (230, 220, 60)
# Quality 100 without chroma subsampling: a few levels of error, far below the colour gaps.
JPEG_EXACT = [
    cv2.IMWRITE_JPEG_QUALITY,
    100,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
]
JPEG_TOLERANCE = 8

# What a viewer shows for each orientation, in the EXIF specification's own words.
SHOWN: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda stored: stored,
    2: lambda stored: stored[:, ::-1],  # mirror horizontal
    3: lambda stored: np.rot90(stored, k=2),  # rotate 180
    4: lambda stored: stored[::-1],  # mirror vertical
    5: lambda stored: np.rot90(stored[:, ::-1], k=1),  # mirror horizontal, rotate 270 CW
    6: lambda stored: np.rot90(stored, k=-1),  # rotate 90 CW
    7: lambda stored: np.rot90(stored[:, ::-1], k=-1),  # mirror horizontal, rotate 90 CW
    8: lambda stored: np.rot90(stored, k=1),  # rotate 270 CW
}


def quadrants() -> np.ndarray:
    """A 24x40 RGB image with four differently coloured quadrants: no symmetry maps it to itself."""
    image = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[: HEIGHT // 2, : WIDTH // 2] = TOP_LEFT
    image[: HEIGHT // 2, WIDTH // 2 :] = TOP_RIGHT
    image[HEIGHT // 2 :, : WIDTH // 2] = BOTTOM_LEFT
    image[HEIGHT // 2 :, WIDTH // 2 :] = BOTTOM_RIGHT
    return image


def tiff_block(
    orientation: int = 1,
    order: str = "<",
    *,
    mark: bytes | None = None,
    magic: int = 42,
    ifd0: int = 8,
    kind: int = 3,
    count: int = 1,
    entries: int | None = None,
) -> bytes:
    """A TIFF header and an IFD0 with a Make entry then the Orientation entry."""
    mark = mark if mark is not None else (b"II" if order == "<" else b"MM")
    make = struct.pack(order + "HHI4s", 0x010F, 2, 4, b"Cam\x00")
    value = struct.pack(order + "H", orientation & 0xFFFF) + b"\x00\x00"
    rotation = struct.pack(order + "HHI", 0x0112, kind, count) + value
    listed = 2 if entries is None else entries
    ifd = struct.pack(order + "H", listed) + make + rotation + struct.pack(order + "I", 0)
    return mark + struct.pack(order + "HI", magic, ifd0) + ifd


def with_jpeg_exif(jpeg: bytes, tiff: bytes, prefix: bytes = b"Exif\x00\x00") -> bytes:
    """The JPEG with an APP1 segment holding `tiff` right after its SOI marker."""
    payload = prefix + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload
    return jpeg[:2] + app1 + jpeg[2:]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def with_png_exif(png: bytes, tiff: bytes, after_idat: bool = False) -> bytes:
    """The PNG with an eXIf chunk after IHDR (or just before IEND)."""
    at = len(png) - 12 if after_idat else 8 + 25
    return png[:at] + png_chunk(b"eXIf", tiff) + png[at:]


def with_webp_exif(webp: bytes, tiff: bytes, width: int, height: int) -> bytes:
    """A simple-format WebP rewrapped as extended (VP8X) with an EXIF chunk after the image."""
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x08\x00\x00\x00" + canvas
    exif = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + b"\x00" * (len(tiff) & 1)
    body = b"WEBP" + vp8x + webp[12:] + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg(image: np.ndarray) -> bytes:
    return encode(image, ".jpg", JPEG_EXACT)


def assert_close(decoded: np.ndarray, expected: np.ndarray) -> None:
    assert decoded.shape == expected.shape
    error = np.abs(decoded.astype(np.int16) - expected.astype(np.int16)).max()
    assert error <= JPEG_TOLERANCE


def corner_colours(image: np.ndarray) -> np.ndarray:
    """Mean colours of the corner 4x4 patches: top left, top right, bottom left, bottom right."""
    patches = [image[:4, :4], image[:4, -4:], image[-4:, :4], image[-4:, -4:]]
    return np.array([patch.reshape(-1, 3).mean(axis=0) for patch in patches])


@pytest.mark.parametrize("order", ["<", ">"], ids=["II", "MM"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_decodes_as_shown_for_each_orientation(orientation: int, order: str) -> None:
    stored = quadrants()
    data = with_jpeg_exif(jpeg(stored), tiff_block(orientation, order))
    decoded = decode_image(data, LIMITS)
    expected = SHOWN[orientation](stored)
    sideways = orientation >= 5
    assert decoded.shape == ((WIDTH, HEIGHT, 3) if sideways else (HEIGHT, WIDTH, 3))
    assert_close(decoded, expected)
    np.testing.assert_allclose(
        corner_colours(decoded), corner_colours(expected), atol=JPEG_TOLERANCE
    )


def test_the_corners_land_where_a_viewer_shows_them() -> None:
    # Spelled out for two cases, independent of SHOWN: 6 turns the top-left corner to the top
    # right, 8 turns it to the bottom left.
    stored = quadrants()
    turned_right = decode_image(with_jpeg_exif(jpeg(stored), tiff_block(6)), LIMITS)
    turned_left = decode_image(with_jpeg_exif(jpeg(stored), tiff_block(8)), LIMITS)
    np.testing.assert_allclose(
        corner_colours(turned_right),
        [BOTTOM_LEFT, TOP_LEFT, BOTTOM_RIGHT, TOP_RIGHT],
        atol=JPEG_TOLERANCE,
    )
    np.testing.assert_allclose(
        corner_colours(turned_left),
        [TOP_RIGHT, BOTTOM_RIGHT, TOP_LEFT, BOTTOM_LEFT],
        atol=JPEG_TOLERANCE,
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_exif_chunk_is_applied_exactly(orientation: int) -> None:
    stored = quadrants()
    for order in ("<", ">"):
        data = with_png_exif(encode(stored), tiff_block(orientation, order))
        np.testing.assert_array_equal(decode_image(data, LIMITS), SHOWN[orientation](stored))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_webp_exif_chunk_is_applied_exactly(orientation: int) -> None:
    stored = quadrants()
    lossless = encode(stored, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])
    for prefix in (b"", b"Exif\x00\x00"):
        tiff = prefix + tiff_block(orientation, ">")
        data = with_webp_exif(lossless, tiff, WIDTH, HEIGHT)
        assert (read_header(data).width, read_header(data).height) == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(decode_image(data, LIMITS), SHOWN[orientation](stored))


def test_png_exif_after_the_image_data_is_ignored() -> None:
    stored = quadrants()
    data = with_png_exif(encode(stored), tiff_block(6), after_idat=True)
    np.testing.assert_array_equal(decode_image(data, LIMITS), stored)


MALFORMED = {
    "orientation 0": tiff_block(0),
    "orientation 9": tiff_block(9),
    "orientation 65535": tiff_block(65535, ">"),
    "IFD0 past the end": tiff_block(6, ifd0=10_000),
    "IFD0 at the last byte": tiff_block(6, ifd0=len(tiff_block(6)) - 1),
    "entry count past the end": tiff_block(6, entries=0xFFFF)[:-16],
    "orientation not listed in the entry count": tiff_block(6, entries=1),
    "byte order XX": tiff_block(6, mark=b"XX"),
    "byte order II with big-endian data": tiff_block(6, ">", mark=b"II"),
    "byte order MM with little-endian data": tiff_block(6, "<", mark=b"MM"),
    "TIFF magic not 42": tiff_block(6, magic=43),
    "orientation as a LONG": tiff_block(6, kind=4),
    "two orientation values": tiff_block(6, count=2),
    "empty TIFF block": b"",
    "header only": tiff_block(6)[:8],
}


@pytest.mark.parametrize("tiff", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_exif_means_orientation_1(tiff: bytes) -> None:
    stored = quadrants()
    assert_close(decode_image(with_jpeg_exif(jpeg(stored), tiff), LIMITS), stored)
    np.testing.assert_array_equal(decode_image(with_png_exif(encode(stored), tiff), LIMITS), stored)


def test_a_tiff_block_cut_short_of_the_orientation_entry_means_orientation_1() -> None:
    stored = quadrants()
    encoded = jpeg(stored)
    tiff = tiff_block(6)
    whole_entry = len(tiff) - 4  # the block ends with the 4-byte offset of the next IFD
    for end in range(whole_entry):
        assert_close(decode_image(with_jpeg_exif(encoded, tiff[:end]), LIMITS), stored)
    for end in range(whole_entry, len(tiff)):
        decoded = decode_image(with_jpeg_exif(encoded, tiff[:end]), LIMITS)
        assert_close(decoded, SHOWN[6](stored))


def test_app1_that_is_not_exif_is_ignored() -> None:
    stored = quadrants()
    xmp = with_jpeg_exif(jpeg(stored), tiff_block(6), prefix=b"http://ns.adobe.com/xap/1.0/\x00")
    assert_close(decode_image(xmp, LIMITS), stored)


def test_random_damage_to_the_exif_never_escapes_as_an_error() -> None:
    stored = quadrants()
    encoded = jpeg(stored)
    tiff = tiff_block(6)
    rng = random.Random(0x0112)
    for _ in range(300):
        damaged = bytearray(tiff)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        decoded = decode_image(with_jpeg_exif(encoded, bytes(damaged)), LIMITS)
        assert decoded.shape in ((HEIGHT, WIDTH, 3), (WIDTH, HEIGHT, 3))


def test_limits_apply_to_a_rotated_image_as_to_the_stored_one() -> None:
    data = with_jpeg_exif(jpeg(quadrants()), tiff_block(6))
    with pytest.raises(ImageTooLarge):
        decode_image(data, ImageLimits(max_pixels=HEIGHT * WIDTH - 1, min_side=8))
    with pytest.raises(ImageTooSmall):
        decode_image(data, ImageLimits(min_side=HEIGHT + 1))
    assert decode_image(data, ImageLimits(max_pixels=HEIGHT * WIDTH, min_side=HEIGHT)).shape == (
        WIDTH,
        HEIGHT,
        3,
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_agrees_with_pillow_on_a_jpeg_that_pillow_wrote(orientation: int) -> None:
    pil_image = pytest.importorskip("PIL.Image")
    pil_ops = pytest.importorskip("PIL.ImageOps")
    stored = pil_image.fromarray(quadrants())
    exif = pil_image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Phone"
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    shown = np.asarray(pil_ops.exif_transpose(pil_image.open(buffer)))
    assert_close(decode_image(buffer.getvalue(), LIMITS), shown)
