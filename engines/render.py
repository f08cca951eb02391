"""Maps at model resolution -> resized, normalised -> PNG bytes or a raw float32 buffer."""

import cv2
import numpy as np

from engines.images import Region


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    if heatmap.shape == (height, width):
        return heatmap.astype(np.float32, copy=False)
    resized: np.ndarray = cv2.resize(
        heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    return resized


def to_image_geometry(heatmap: np.ndarray, region: Region, height: int, width: int) -> np.ndarray:
    """A map over the model's input, placed where that input lies in the original image.

    With a centre crop the map covers only the crop; outside it the map is 0 (no evidence).
    """
    canvas = np.zeros((height, width), dtype=np.float32)
    top, left = round(region.top), round(region.left)
    bottom = min(height, round(region.top + region.height))
    right = min(width, round(region.left + region.width))
    if bottom <= top or right <= left:
        return canvas
    canvas[top:bottom, left:right] = resize_map(heatmap, bottom - top, right - left)
    return canvas


def minmax(heatmap: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes all zeros rather than dividing by zero."""
    low = float(heatmap.min())
    span = float(heatmap.max()) - low
    if span <= 0 or not np.isfinite(span):
        return np.zeros_like(heatmap, dtype=np.float32)
    scaled: np.ndarray = ((heatmap - low) / span).astype(np.float32)
    return scaled


def encode_png_gray8(heatmap: np.ndarray) -> bytes:
    pixels = np.round(minmax(heatmap) * 255.0).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return bytes(encoded)


def encode_float32(heatmap: np.ndarray) -> bytes:
    return np.ascontiguousarray(heatmap, dtype="<f4").tobytes()
