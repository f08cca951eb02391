"""Test images: generated with OpenCV or taken from scikit-image's bundled photos."""

import cv2
import numpy as np


def solid(rgb: tuple[int, int, int], height: int = 32, width: int = 32) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rgb
    return image


def encode(image_rgb: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(image_rgb[..., ::-1]), params or [])
    assert ok
    return bytes(buffer)


def photo(name: str) -> np.ndarray:
    import skimage.data

    image: np.ndarray = getattr(skimage.data, name)()
    return image
