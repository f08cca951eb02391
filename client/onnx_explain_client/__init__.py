"""A typed Python client for the onnx-explain HTTP API.

from onnx_explain_client import ExplainClient

with ExplainClient("http://127.0.0.1:8000") as service:
    result = service.explain("cat.png", "efficientnet-lite0", "gradcam",
                             formats=["array", "overlay"])
    explanation = result.explanations[0]
    explanation.array                   # float32 (H, W) numpy map
    explanation.get("overlay").png      # PNG bytes
"""

from onnx_explain_client.errors import ClientError, ConnectionFailed, ServiceError
from onnx_explain_client.http import (
    DEFAULT_URL,
    ExplainClient,
    ImageSource,
    encode_png,
    image_bytes,
)
from onnx_explain_client.results import DecodedHeatmap, ExplainResult, ExplanationResult, decode_png

__all__ = [
    "DEFAULT_URL",
    "ClientError",
    "ConnectionFailed",
    "DecodedHeatmap",
    "ExplainClient",
    "ExplainResult",
    "ExplanationResult",
    "ImageSource",
    "ServiceError",
    "decode_png",
    "encode_png",
    "image_bytes",
]
