"""Issue 14: our hand-written image header and EXIF parsers against Pillow's lazy Image.open.

    python -m benchmarks.image_headers

Runs both on the hostile-image corpus of the tests, on the EXIF cases (every orientation,
each container, and the malformed TIFF blocks), and on ordinary photos, and prints where they
disagree (format, size, orientation, or one refusing what the other reads) and the time each
takes to read a header. Needs Pillow (installed with the `models` extra's scikit-image); the
service itself does not import it.
"""

import io
import statistics
import time
import warnings
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from engines.errors import EngineError
from engines.imaging.decode import exif_orientation, read_header
from tests import test_exif as exif_cases
from tests.images import encode, photo
from tests.test_hostile_images import CORPUS

Reading = tuple[str, int, int, int] | str


def ours(data: bytes) -> Reading:
    try:
        header = read_header(data)
        return (header.format, header.width, header.height, exif_orientation(data, header.format))
    except EngineError as exc:
        return f"refused ({exc.code})"


def pillow(data: bytes) -> Reading:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = (image.format or "?").lower()
                orientation = int(image.getexif().get(0x0112, 1))
                if orientation not in range(1, 9):
                    orientation = 1
                return (fmt, image.width, image.height, orientation)
    except Exception as exc:  # Pillow raises many types
        return f"refused ({type(exc).__name__})"


def cases() -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = [(f"hostile: {h.name}", h.make()) for h in CORPUS]
    stored = exif_cases.quadrants()
    jpeg, png = exif_cases.jpeg(stored), encode(stored)
    _, webp_buffer = cv2.imencode(".webp", stored[:, :, ::-1], [cv2.IMWRITE_WEBP_QUALITY, 101])
    webp = bytes(webp_buffer)
    height, width = stored.shape[:2]
    for orientation in range(1, 9):
        tiff = exif_cases.tiff_block(orientation)
        found.append((f"jpeg exif {orientation}", exif_cases.with_jpeg_exif(jpeg, tiff)))
        found.append((f"png exif {orientation}", exif_cases.with_png_exif(png, tiff)))
        found.append(
            (f"webp exif {orientation}", exif_cases.with_webp_exif(webp, tiff, width, height))
        )
    for name, tiff in exif_cases.MALFORMED.items():
        found.append((f"jpeg malformed exif: {name}", exif_cases.with_jpeg_exif(jpeg, tiff)))
    return found


def median_us(read: Callable[[bytes], Reading], data: bytes, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read(data)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    disagreements = 0
    all_cases = cases()
    for name, data in all_cases:
        a, b = ours(data), pillow(data)
        same = a == b or (isinstance(a, str) and isinstance(b, str))
        if not same:
            disagreements += 1
            print(f"{name:55s} ours: {a}  pillow: {b}")
    print(f"{disagreements} of {len(all_cases)} cases read differently")
    chelsea = photo("chelsea")
    formats = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, 90], ".png": [], ".webp": []}
    for ext, params in formats.items():
        data = encode(np.ascontiguousarray(chelsea), ext, params)
        print(
            f"header of a {len(data) // 1024} KiB {ext[1:]}: "
            f"ours {median_us(ours, data):.1f} us, pillow {median_us(pillow, data):.1f} us"
        )


if __name__ == "__main__":
    main()
