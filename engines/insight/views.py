"""Model insight: a Keras-style layer summary, Conv filter grids, feature-map grids.

Pure onnx/numpy/OpenCV; no web imports.
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np
import onnx
from onnx import numpy_helper

from engines.errors import InvalidParameters, UnsupportedModel
from engines.graphs.shapes import with_shapes
from engines.imaging.render import minmax
from engines.models.layers import shape_of
from schemas.model_config import InputSpec

Shape = tuple[int | str, ...]

TILE_GAP = 1
MIN_TILE_SIDE = 32
MAX_FILTER_TILES = 1024
MAX_NAME_COLUMN = 48

# --- summary ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    name: str
    op_type: str
    output: str
    output_shape: Shape | None
    params: int


@dataclass(frozen=True)
class Summary:
    input_shape: Shape
    rows: list[SummaryRow]
    total_params: int

    @property
    def nodes(self) -> int:
        return len(self.rows)


def model_input_shape(spec: InputSpec) -> tuple[int, int, int, int]:
    return (1, *spec.image_dims)


def summarize(model: onnx.ModelProto, input_name: str, spec: InputSpec) -> Summary:
    """One row per node: op type, first output's inferred shape, parameters it consumes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    shape = model_input_shape(spec)
    for graph_input in fixed.graph.input:
        if graph_input.name == input_name:
            dims = graph_input.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                for dim, value in zip(dims, shape, strict=True):
                    dim.Clear()
                    dim.dim_value = value
    graph = with_shapes(fixed).graph  # best effort: rows without shapes
    shapes: dict[str, Shape] = {}
    for value_info in [*graph.input, *graph.value_info, *graph.output]:
        found = shape_of(value_info)
        if found is not None:
            shapes[value_info.name] = found
    sizes = {init.name: math.prod(init.dims) for init in graph.initializer}
    for init in graph.sparse_initializer:
        sizes[init.values.name] = math.prod(init.dims)
    counted: set[str] = set()
    rows: list[SummaryRow] = []
    for node in graph.node:
        params = 0
        for name in node.input:
            if name in sizes and name not in counted:
                counted.add(name)
                params += sizes[name]
        output = node.output[0] if node.output else ""
        rows.append(
            SummaryRow(
                name=node.name or output,
                op_type=node.op_type,
                output=output,
                output_shape=shapes.get(output),
                params=params,
            )
        )
    return Summary(shape, rows, sum(row.params for row in rows))


def _format_shape(shape: Shape | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join(str(d) for d in shape) + ")"


def summary_text(summary: Summary, title: str) -> str:
    """The table as plain text, Keras-style."""

    def clip(text: str) -> str:
        return text if len(text) <= MAX_NAME_COLUMN else text[: MAX_NAME_COLUMN - 3] + "..."

    header = ("Node (op)", "Output shape", "Param #")
    cells = [
        (clip(f"{row.name} ({row.op_type})"), _format_shape(row.output_shape), f"{row.params:,}")
        for row in summary.rows
    ]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(3)]

    def line(values: tuple[str, str, str]) -> str:
        return (
            f"{values[0]:<{widths[0]}}  {values[1]:<{widths[1]}}  {values[2]:>{widths[2]}}"
        ).rstrip()

    rule_width = sum(widths) + 4
    out = [
        f'Model: "{title}"',
        f"Input: {_format_shape(summary.input_shape)}",
        "=" * rule_width,
        line(header),
        "=" * rule_width,
        *(line(c) for c in cells),
        "=" * rule_width,
        f"Total params: {summary.total_params:,}",
        f"Nodes: {summary.nodes:,}",
    ]
    return "\n".join(out) + "\n"


# --- grids -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    png: bytes
    rows: int
    cols: int
    tile: tuple[int, int]
    tiles: int
    color: str


def tile_size(height: int, width: int) -> tuple[int, int]:
    """Small maps are enlarged by a whole factor so each tile is at least MIN_TILE_SIDE."""
    factor = max(1, math.ceil(MIN_TILE_SIDE / max(1, min(height, width))))
    return height * factor, width * factor


def grid_shape(count: int, cols: int | None = None) -> tuple[int, int]:
    columns = cols if cols is not None else max(1, math.ceil(math.sqrt(count)))
    return max(1, math.ceil(count / columns)), columns


def make_grid(
    tiles: list[np.ndarray],
    cols: int | None = None,
    labels: list[str] | None = None,
) -> Grid:
    """Unit-range tiles (H, W) gray or (H, W, 3) RGB -> one PNG, row by row, 1 px apart."""
    if not tiles:
        raise InvalidParameters("nothing to draw")
    height, width = tiles[0].shape[:2]
    th, tw = tile_size(height, width)
    rows, columns = grid_shape(len(tiles), cols)
    color = tiles[0].ndim == 3
    canvas_shape: tuple[int, ...] = (
        rows * th + (rows - 1) * TILE_GAP,
        columns * tw + (columns - 1) * TILE_GAP,
    )
    if color:
        canvas_shape = (*canvas_shape, 3)
    canvas = np.zeros(canvas_shape, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        pixels = np.round(np.clip(tile, 0.0, 1.0) * 255.0).astype(np.uint8)
        if color:
            pixels = np.ascontiguousarray(pixels[..., ::-1])  # RGB -> OpenCV's BGR
        pixels = cv2.resize(pixels, (tw, th), interpolation=cv2.INTER_NEAREST)
        if labels is not None:
            _label(pixels, labels[index])
        r, c = divmod(index, columns)
        top, left = r * (th + TILE_GAP), c * (tw + TILE_GAP)
        canvas[top : top + th, left : left + tw] = pixels
    ok, encoded = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return Grid(bytes(encoded), rows, columns, (th, tw), len(tiles), "rgb" if color else "gray")


def _label(pixels: np.ndarray, text: str) -> None:
    scale = max(0.3, min(pixels.shape[:2]) / 96)
    thickness = 1
    (_, text_h), _baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    origin = (2, text_h + 2)
    white: tuple[int, ...] = (255, 255, 255) if pixels.ndim == 3 else (255,)
    black: tuple[int, ...] = (0, 0, 0) if pixels.ndim == 3 else (0,)
    cv2.putText(pixels, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, black, thickness + 2)
    cv2.putText(pixels, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, white, thickness)


# --- filters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvWeights:
    name: str
    output: str
    weights: np.ndarray
    """float32, (filters, in/group, kh, kw)."""
    bias: np.ndarray | None


def conv_weights(model: onnx.ModelProto, layer: str | None) -> ConvWeights:
    """A Conv node's weights, by node name or output name; by default the first Conv."""
    graph = model.graph
    node = None
    for candidate in graph.node:
        if layer is None:
            if candidate.op_type == "Conv":
                node = candidate
                break
        elif candidate.name == layer or layer in candidate.output:
            node = candidate
            break
    if node is None:
        if layer is None:
            raise InvalidParameters("the model has no Conv layer")
        raise InvalidParameters(f"layer: the model has no node or output named {layer!r}")
    if node.op_type != "Conv":
        raise InvalidParameters(f"layer: {layer!r} is a {node.op_type}, not a Conv")
    inits = {init.name: init for init in graph.initializer}
    if len(node.input) < 2 or node.input[1] not in inits:
        raise UnsupportedModel(f"layer: the weights of Conv {node.name!r} are not an initializer")
    weights = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32, copy=False)
    if weights.ndim != 4:
        raise UnsupportedModel(f"layer: Conv {node.name!r} is not 2-D (weights {weights.shape})")
    bias = None
    if len(node.input) > 2 and node.input[2] in inits:
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32, copy=False)
    return ConvWeights(node.name or node.output[0], node.output[0], weights, bias)


@dataclass(frozen=True)
class FilterGrid:
    grid: Grid
    channels_shown: int


def filter_grid(weights: np.ndarray) -> FilterGrid:
    """(n, in, kh, kw) -> 3 input channels: an RGB tile per filter; otherwise a row per filter,
    a grayscale tile per input channel (capped so the grid has at most MAX_FILTER_TILES)."""
    count, inputs = weights.shape[:2]
    if inputs == 3:
        tiles = [minmax(w).transpose(1, 2, 0) for w in weights]
        return FilterGrid(make_grid(tiles), 3)
    shown = max(1, min(inputs, MAX_FILTER_TILES // max(1, count)))
    tiles = [minmax(w[c]) for w in weights for c in range(shown)]
    return FilterGrid(make_grid(tiles, cols=shown), shown)


# --- activations -----------------------------------------------------------------------------


def pick_channels(total: int, chosen: list[int] | None, cap: int, layer: str) -> list[int]:
    if chosen is None:
        return list(range(min(total, cap)))
    out_of_range = [c for c in chosen if not 0 <= c < total]
    if out_of_range:
        raise InvalidParameters(
            f"channels: {out_of_range[0]} is out of range for layer {layer!r} ({total} channels)"
        )
    return list(chosen)


def activation_grid(maps: np.ndarray, channels: list[int]) -> Grid:
    """(C, H, W) maps -> a grid of the chosen channels, each min-max scaled and numbered."""
    tiles = [minmax(maps[c]) for c in channels]
    return make_grid(tiles, labels=[str(c) for c in channels])
