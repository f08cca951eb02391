"""Activation maximization: the input that maximizes a class score, by gradient ascent.

Each step runs the input-gradient graph seeded with the target's one-hot row, then applies the
regularizers that keep the image readable: random jitter (undone after the step), L2 decay, a
Gaussian blur every few steps and clipping to the values real pixels can take.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from engines.errors import InvalidParameters
from engines.graphs import GradientSpec, build_gradient_model
from engines.graphs.prepared import GraphKey
from engines.imaging.decode import blur_tensor, normalize_fitted, to_pixels
from engines.methods.pipeline import seeds_for
from engines.models.layers import LayerInfo
from engines.models.loaded import LoadedModel
from engines.runtime.deadline import current_deadline
from schemas.maximize import MaximizeParams
from schemas.model_config import InputSpec

INPUT_GRADIENT = GraphKey(layer=None, wrt_input=True, guided=False, top_k_seeds=False)
EPSILON = 1e-12

StepCallback = Callable[[int, float], None]
"""Hears `(step, score)` after each step's gradient run."""


@dataclass(frozen=True)
class Maximized:
    tensor: np.ndarray
    """The final input, (1, ...) in the model's layout."""
    pixels: np.ndarray
    """The final input as RGB uint8 pixels, (H, W, 3)."""
    score: float
    """The target's raw output for the final input."""
    scores: list[float]
    """The target's output at each step, before that step's update."""


def _channel_shape(spec: InputSpec) -> tuple[int, ...]:
    channels = spec.channels
    return (1, channels, 1, 1) if spec.layout == "NCHW" else (1, 1, 1, channels)


def valid_range(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel tensor values of pixels 0 and 255, broadcastable over a batch."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(_channel_shape(spec))
    std = np.asarray(spec.std, dtype=np.float32).reshape(_channel_shape(spec))
    black = (np.float32(0.0) - mean) / std
    white = (np.float32(255.0 * spec.scale) - mean) / std
    return np.minimum(black, white), np.maximum(black, white)


def to_tensor(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, 3) RGB pixel values (any float) at the input size -> a (1, ...) tensor.

    The pixels are already the model's input: never resized or cropped again.
    """
    return normalize_fitted([pixels], spec)


def start_tensor(spec: InputSpec, params: MaximizeParams) -> np.ndarray:
    shape = (spec.height, spec.width, 3)
    if params.start == "zeros":
        zeros = to_tensor(np.zeros(shape), spec)
        return np.zeros_like(zeros)
    if params.start == "noise":
        rng = np.random.default_rng(params.seed)
        return to_tensor(rng.uniform(96.0, 160.0, size=shape), spec)
    return to_tensor(np.full(shape, 128.0), spec)


def maximize(
    model: LoadedModel,
    target: int,
    params: MaximizeParams,
    on_step: StepCallback | None = None,
    start: np.ndarray | None = None,
) -> Maximized:
    """Gradient ascent on the input for `params.steps` steps (checks the deadline each step)."""
    spec = model.config.input
    axes = spec.spatial_axes
    low, high = valid_range(spec)
    tensor: np.ndarray = (start if start is not None else start_tensor(spec, params)).astype(
        np.float32
    )
    objective = (
        channel_objective(model, params.layer, target)
        if params.layer is not None
        else class_objective(model, target)
    )
    rng = np.random.default_rng(params.seed)
    deadline = current_deadline()
    scores: list[float] = []
    for step in range(params.steps):
        if deadline is not None:
            deadline.check()
        shift = (0, 0)
        if params.jitter > 0:
            dy, dx = rng.integers(-params.jitter, params.jitter + 1, size=2)
            shift = (int(dy), int(dx))
            tensor = np.roll(tensor, shift, axis=axes)
        score, gradient = objective(tensor)
        if params.normalize_gradient:
            gradient = (gradient / (np.abs(gradient).mean() + EPSILON)).astype(np.float32)
        tensor = tensor + np.float32(params.learning_rate) * gradient
        if params.l2_decay > 0:
            tensor = tensor * np.float32(1.0 - params.l2_decay)
        if shift != (0, 0):
            tensor = np.roll(tensor, (-shift[0], -shift[1]), axis=axes)
        if params.blur_every > 0 and params.blur_sigma > 0 and (step + 1) % params.blur_every == 0:
            tensor = blur_tensor(tensor, model.channel_axis, params.blur_sigma)
        if params.clip:
            tensor = np.clip(tensor, low, high).astype(np.float32)
        scores.append(score)
        if on_step is not None:
            on_step(step, score)
    if deadline is not None:
        deadline.check()
    final, _ = objective(tensor)
    return Maximized(tensor, to_pixels(tensor, spec), final, scores)


Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]
"""An input tensor (1, ...) -> (the score being maximized, its gradient shaped like the input)."""


def class_objective(model: LoadedModel, target: int) -> Objective:
    seeds = seeds_for([target], model.num_classes or target + 1)

    def score(tensor: np.ndarray) -> tuple[float, np.ndarray]:
        result = model.gradients.run(INPUT_GRADIENT, model.input_name, tensor, seeds=seeds)
        assert result.grad_input is not None
        gradient = result.grad_input.reshape(tensor.shape).astype(np.float32)
        return float(result.outputs[0, target]), gradient

    return score


LAYER_MEANS = "maximize/layer_means"


def layer_means_model(model: LoadedModel, layer: LayerInfo) -> onnx.ModelProto:
    """The forward graph with one output: the per-channel spatial means of `layer`, (N, C)."""
    graph_model = onnx.ModelProto()
    graph_model.CopyFrom(model.graph)
    graph = graph_model.graph
    # GlobalAveragePool and Flatten rather than ReduceMean: both have gradient rules.
    source = layer.name
    if layer.layout == "NHWC":
        source = "maximize/channels_first"
        graph.node.append(
            onnx.helper.make_node("Transpose", [layer.name], [source], perm=[0, 3, 1, 2])
        )
    graph.node.append(onnx.helper.make_node("GlobalAveragePool", [source], ["maximize/pool"]))
    graph.node.append(onnx.helper.make_node("Flatten", ["maximize/pool"], [LAYER_MEANS]))
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(LAYER_MEANS, onnx.TensorProto.FLOAT, None)
    )
    return graph_model


def channel_objective(model: LoadedModel, layer: str, channel: int) -> Objective:
    """Mean activation of one channel of a layer, through a gradient graph of the layer means."""
    info = model.layer(layer)
    channels = info.shape[info.channel_axis]
    if not isinstance(channels, int) or not 0 <= channel < channels:
        raise InvalidParameters(f"channel {channel} is out of range for layer {layer!r}")

    def make() -> onnx.ModelProto:
        spec = GradientSpec(output=LAYER_MEANS, wrt_input=True)
        return build_gradient_model(layer_means_model(model, info), spec)

    session = model.sessions.get("maximize", layer, make, 2 * model.activation_bytes)
    seeds = seeds_for([channel], channels)

    def score(tensor: np.ndarray) -> tuple[float, np.ndarray]:
        feeds = {model.input_name: tensor, "seed": seeds}
        means, gradient = session.run(feeds, [LAYER_MEANS, "grad_input"])
        return float(means[0, channel]), gradient.reshape(tensor.shape).astype(np.float32)

    return score
