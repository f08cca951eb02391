"""Engine maps -> the shared heatmap payload of every explanation response."""

import base64
from typing import Literal

import numpy as np

from engines.render import encode_float32, encode_png_gray8
from schemas.heatmap import ArrayHeatmap, PngHeatmap


def heatmap_payload(heatmap: np.ndarray, fmt: Literal["png", "array"]) -> PngHeatmap | ArrayHeatmap:
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is 2-D, got shape {heatmap.shape}")
    if fmt == "png":
        return PngHeatmap(data=base64.b64encode(encode_png_gray8(heatmap)).decode())
    height, width = heatmap.shape
    return ArrayHeatmap(
        shape=(int(height), int(width)),
        data=base64.b64encode(encode_float32(heatmap)).decode(),
    )
