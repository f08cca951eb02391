"""Explain answers with their heatmaps decoded: numpy maps and raw PNG bytes."""

import base64
import binascii
from dataclasses import dataclass

import numpy as np
import png

from onnx_explain_client.errors import ClientError
from onnx_explain_client.schemas.explain import ExplainResponse, Explanation, Faithfulness
from onnx_explain_client.schemas.heatmap import (
    PNG16_MAX,
    PNG_FORMATS,
    ArrayHeatmap,
    HeatmapFormat,
    HeatmapPayload,
    JsonHeatmap,
)
from onnx_explain_client.schemas.predict import Prediction

# The most exact float map first when an explanation carries several formats.
VALUE_PREFERENCE: tuple[HeatmapFormat, ...] = ("array", "json", "png16", "png")
_PNG_SCALE: dict[HeatmapFormat, float] = {"png": 255.0, "png16": float(PNG16_MAX)}
_ARRAY_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) gray (uint8 or uint16) or (H, W, 3) RGB pixels."""
    try:
        width, height, rows, info = png.Reader(bytes=data).read_flat()
    except png.Error as exc:
        raise ClientError("the service sent a PNG that cannot be decoded") from exc
    planes = int(info["planes"])
    dtype = np.uint16 if int(info["bitdepth"]) > 8 else np.uint8
    pixels = np.asarray(rows, dtype=dtype).reshape(height, width, planes)
    if info.get("palette") or planes not in (1, 3):
        raise ClientError(f"the service sent a PNG with {planes} planes; maps are gray or RGB")
    return pixels[:, :, 0] if planes == 1 else pixels


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError("the service sent a heatmap that is not valid base64") from exc


def _array_values(payload: ArrayHeatmap) -> np.ndarray:
    buffer = _b64decode(payload.data)
    flat = np.frombuffer(buffer, dtype=_ARRAY_DTYPES[payload.dtype])
    if flat.size != payload.shape[0] * payload.shape[1]:
        raise ClientError(f"an array heatmap holds {flat.size} values, not {payload.shape}")
    values: np.ndarray = flat.reshape(payload.shape).astype(np.float32)
    return values


def _json_values(payload: JsonHeatmap) -> np.ndarray:
    values = np.asarray(payload.values, dtype=np.float32)
    if values.shape != payload.shape:
        raise ClientError(f"a json heatmap has shape {values.shape}, not {payload.shape}")
    return values


@dataclass(frozen=True)
class DecodedHeatmap:
    """One payload of an explanation with its content decoded."""

    payload: HeatmapPayload
    png: bytes | None
    """The PNG file, for `png`, `png16`, `colormap` and `overlay`."""
    values: np.ndarray | None
    """The map as float32 (H, W): the payload's values for `array` and `json` (raw with
    `normalize: none`), the normalised [0, 1] map for `png` and `png16`; None for the RGB formats.
    """

    @property
    def format(self) -> HeatmapFormat:
        return self.payload.format

    @classmethod
    def from_payload(cls, payload: HeatmapPayload) -> "DecodedHeatmap":
        if isinstance(payload, ArrayHeatmap):
            return cls(payload, None, _array_values(payload))
        if isinstance(payload, JsonHeatmap):
            return cls(payload, None, _json_values(payload))
        png = _b64decode(payload.data)
        scale = _PNG_SCALE.get(payload.format)
        values = None if scale is None else decode_png(png).astype(np.float32) / scale
        return cls(payload, png, values)

    def image(self) -> np.ndarray:
        """The PNG's pixels: gray for `png`/`png16`, RGB for `colormap`/`overlay`."""
        if self.png is None:
            raise ClientError(f"a `{self.format}` heatmap is not an image")
        return decode_png(self.png)


@dataclass(frozen=True)
class ExplanationResult:
    """The maps of one target class, one per requested format, in request order."""

    target: int
    label: str
    heatmaps: list[DecodedHeatmap]
    metrics: Faithfulness | None = None
    """Deletion/insertion scores, when the request asked for `metrics`."""

    @classmethod
    def from_schema(cls, explanation: Explanation) -> "ExplanationResult":
        decoded = [DecodedHeatmap.from_payload(p) for p in explanation.heatmaps]
        return cls(explanation.target, explanation.label, decoded, explanation.metrics)

    @property
    def heatmap(self) -> DecodedHeatmap:
        """The first requested format."""
        return self.heatmaps[0]

    def get(self, fmt: HeatmapFormat) -> DecodedHeatmap:
        for heatmap in self.heatmaps:
            if heatmap.format == fmt:
                return heatmap
        have = ", ".join(h.format for h in self.heatmaps)
        raise KeyError(f"no `{fmt}` heatmap was asked for (have: {have})")

    @property
    def array(self) -> np.ndarray | None:
        """The most exact float map among the formats: array, json, png16, then png."""
        for fmt in VALUE_PREFERENCE:
            for heatmap in self.heatmaps:
                if heatmap.format == fmt and heatmap.values is not None:
                    return heatmap.values
        return None

    @property
    def png(self) -> bytes | None:
        """The PNG file of the first image format asked for."""
        return next((h.png for h in self.heatmaps if h.format in PNG_FORMATS), None)


@dataclass(frozen=True)
class ExplainResult:
    """The parsed answer (`response`) and its explanations decoded."""

    response: ExplainResponse
    explanations: list[ExplanationResult]

    @classmethod
    def from_response(cls, response: ExplainResponse) -> "ExplainResult":
        decoded = [ExplanationResult.from_schema(e) for e in response.explanations]
        return cls(response, decoded)

    @property
    def model(self) -> str:
        return self.response.model

    @property
    def method(self) -> str:
        return self.response.method

    @property
    def predictions(self) -> list[Prediction]:
        return self.response.predictions

    @property
    def timings_ms(self) -> dict[str, float]:
        return self.response.timings_ms

    @property
    def passes(self) -> int | None:
        """Occluded copies the model ran (occlusion only)."""
        return self.response.passes
