"""A corpus of hostile and unusual images, sent over HTTP as uploads and as base64 JSON.

Each one gets its documented status and error code (or 200 for the odd but valid ones), and the
service answers a good request right after it. Every file is made here, in a few bytes.
"""

import base64
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.images import encode, solid
from tests.test_api import assert_error, assert_still_serving

GREEN = (10, 200, 30)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, and a few bytes of data.

    Decoded it would need width * height * 3 bytes (30 GB here); the file is under 100 bytes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def jpeg_bomb() -> bytes:
    """A JPEG whose frame header claims 65500 x 65500 pixels, with no scan data."""
    real = encode(solid(GREEN, 16, 16), ".jpg")
    sof = real.index(b"\xff\xc0")
    return real[: sof + 5] + struct.pack(">HH", 65_500, 65_500) + real[sof + 9 :]


def webp_bomb() -> bytes:
    """An extended (VP8X) WebP whose canvas claims 16384 x 16384 pixels."""
    size = (16_384 - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + size + size
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def png_with_lying_ihdr(width: int, height: int, fix_crc: bool) -> bytes:
    """A real 16x16 PNG whose IHDR is rewritten to claim another size.

    With `fix_crc` the chunk's checksum is recomputed, as a careful forger would.
    """
    data = bytearray(encode(solid(GREEN, 16, 16)))
    data[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), ".jpg")
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = encode(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return data[: len(data) // 2]


def wrong_magic() -> bytes:
    """A PNG whose first signature byte is changed: the rest is a valid image."""
    return b"\x00" + encode(solid(GREEN))[1:]


def _gif_frame_data(indices: list[int]) -> bytes:
    """LZW image data at minimum code size 2 that never grows past 3-bit codes.

    A clear code every two pixels keeps the table below 8 entries: valid, if not compact.
    """
    clear, end = 4, 5
    codes: list[int] = []
    for start in range(0, len(indices), 2):
        codes += [clear, *indices[start : start + 2]]
    codes.append(end)
    bits = sum(code << (3 * i) for i, code in enumerate(codes))
    packed = bits.to_bytes((3 * len(codes) + 7) // 8, "little")
    blocks = b"".join(
        bytes([len(packed[i : i + 255])]) + packed[i : i + 255] for i in range(0, len(packed), 255)
    )
    return b"\x02" + blocks + b"\x00"


def animated_gif(side: int = 16, frames: int = 2) -> bytes:
    """A looping GIF89a with `frames` solid frames (green, then blue, ...)."""
    palette = bytes([0, 0, 0, *GREEN, 20, 40, 220, 255, 255, 255])  # 4 colours
    header = b"GIF89a" + struct.pack("<HHBBB", side, side, 0xF1, 0, 0) + palette
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    body = b""
    for frame in range(frames):
        control = b"\x21\xf9\x04\x04" + struct.pack("<H", 10) + b"\x00\x00"
        descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0)
        body += control + descriptor + _gif_frame_data([1 + frame % 2] * side * side)
    return header + loop + body + b"\x3b"


def png16() -> bytes:
    image = np.zeros((16, 16, 3), dtype=np.uint16)
    image[:] = [value * 257 for value in GREEN]  # 8-bit green scaled to 16 bits
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return bytes(data)


def grayscale_png() -> bytes:
    ok, data = cv2.imencode(".png", np.full((16, 16), 128, dtype=np.uint8))
    assert ok
    return bytes(data)


def rgba_png() -> bytes:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:] = (*GREEN, 96)  # a translucent green: alpha is dropped, the colour kept
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]))
    assert ok
    return bytes(data)


def webp() -> bytes:
    return encode(solid(GREEN), ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90])


def lossless_webp() -> bytes:
    return encode(solid(GREEN), ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[], bytes]
    status: int
    code: str | None  # None for a 200
    label: str | None = None  # the tiny model's top class, where the image has one colour


CORPUS = [
    Hostile("png decompression bomb", png_bomb, 413, "image_too_large"),
    Hostile("jpeg decompression bomb", jpeg_bomb, 413, "image_too_large"),
    Hostile("webp decompression bomb", webp_bomb, 413, "image_too_large"),
    Hostile("truncated jpeg", truncated_jpeg, 422, "invalid_image"),
    Hostile("truncated png", truncated_png, 422, "invalid_image"),
    Hostile(
        "png header claims more pixels",
        lambda: png_with_lying_ihdr(32, 32, fix_crc=True),
        422,
        "invalid_image",
    ),
    Hostile(
        "png header claims fewer columns",
        lambda: png_with_lying_ihdr(8, 8, fix_crc=True),
        422,
        "invalid_image",
    ),
    Hostile(
        "png header rewritten, checksum stale",
        lambda: png_with_lying_ihdr(32, 32, fix_crc=False),
        422,
        "invalid_image",
    ),
    Hostile("png header cut short", lambda: b"\x89PNG\r\n\x1a\n\x00\x00", 422, "invalid_image"),
    Hostile("wrong magic", wrong_magic, 415, "unsupported_image"),
    Hostile("animated gif", animated_gif, 415, "unsupported_image"),
    Hostile("16-bit png", png16, 200, None, "green"),
    Hostile("grayscale png", grayscale_png, 200, None),
    Hostile("rgba png", rgba_png, 200, None, "green"),
    Hostile("webp", webp, 200, None, "green"),
    Hostile("lossless webp", lossless_webp, 200, None, "green"),
]


def _send(client: TestClient, data: bytes, transport: str) -> object:
    if transport == "multipart":
        files = {"image": ("upload.bin", data, "application/octet-stream")}
        return client.post("/v1/models/tiny/predict", files=files, data={"top_k": "3"})
    image = base64.b64encode(data).decode()
    return client.post("/v1/models/tiny/predict", json={"image": image, "top_k": 3})


@pytest.mark.parametrize("transport", ["multipart", "json"])
@pytest.mark.parametrize("hostile", CORPUS, ids=[case.name for case in CORPUS])
def test_hostile_image_gets_its_answer_and_the_service_keeps_serving(
    tiny_client: TestClient, hostile: Hostile, transport: str
) -> None:
    response = _send(tiny_client, hostile.make(), transport)
    if hostile.code is None:
        assert response.status_code == 200, response.text  # type: ignore[attr-defined]
        predictions = response.json()["predictions"]  # type: ignore[attr-defined]
        assert len(predictions) == 3
        if hostile.label is not None:
            assert predictions[0]["label"] == hostile.label
    else:
        assert_error(response, hostile.status, hostile.code)
    assert_still_serving(tiny_client)


@pytest.mark.parametrize(
    ("transport", "status", "code"),
    [
        # An empty upload reaches the decoder; an empty base64 string fails the schema first.
        ("multipart", 422, "invalid_image"),
        ("json", 422, "invalid_request"),
    ],
)
def test_zero_bytes(tiny_client: TestClient, transport: str, status: int, code: str) -> None:
    assert_error(_send(tiny_client, b"", transport), status, code)
    assert_still_serving(tiny_client)


def test_the_corpus_is_what_it_claims() -> None:
    """The hand-made files parse as what they pretend to be (so a 415 is for the format)."""
    from engines.imaging.decode import read_header

    assert animated_gif().startswith(b"GIF89a")
    assert animated_gif().count(b"\x2c\x00\x00\x00\x00") == 2  # two image descriptors
    assert (read_header(png_bomb()).width, read_header(png_bomb()).height) == (100_000, 100_000)
    assert read_header(jpeg_bomb()).width == 65_500
    assert read_header(webp_bomb()).width == 16_384
    assert read_header(webp()).format == "webp"
    assert read_header(lossless_webp()).format == "webp"
    assert _as_stored(png16()).dtype == np.uint16
    assert _as_stored(rgba_png()).shape == (16, 16, 4)
    assert _as_stored(grayscale_png()).shape == (16, 16)


def _as_stored(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    decoded: np.ndarray = image
    return decoded
