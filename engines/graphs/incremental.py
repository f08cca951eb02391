"""Exact incremental occlusion: where to cut a CNN and what each occluded copy must recompute.

Krypton (Nakandala, Kumar and Papakonstantinou, "Incremental and Approximate Inference for
Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019): an occluded copy differs from the
clean image only inside its patch, and through the first layers only a small region of each
feature map changes. The graph is cut at a tensor every path from the input passes through; the
part before the cut (the prefix) runs on a crop around each patch, and its result's changed
region is pasted into the clean image's activation at the cut before the rest (the suffix) runs
on full maps.

The crop is found by interval arithmetic on each spatial axis along the prefix, op by op
(kernel, stride, begin and end pads, dilation): the changed region is propagated forward to
the cut, the region needed to recompute it backward to the input. A crop starts on a multiple
of the prefix's total stride, so every layer's sampling grid in the crop is the full image's,
and is clamped inside the image, so at the image border it meets the true padding; whatever
the crop's own edges spoil lies outside the region that is pasted. Ops the arithmetic cannot
follow (global pooling, reshapes, anything mixing positions) end the eligible prefix.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.graphs.context import pad_extents

Interval = tuple[int, int]
"""A half-open range [start, stop) of positions along one spatial axis."""
EMPTY: Interval = (0, 0)

POINTWISE = frozenset(
    {
        "Abs", "BatchNormalization", "Cast", "Ceil", "Clip", "Dropout", "Elu", "Erf", "Exp",
        "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Mish",
        "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softplus", "Softsign",
        "Sqrt", "Tanh", "ThresholdedRelu", "Celu", "PRelu",
        "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where",
    }
)  # fmt: skip
"""Ops whose output at a position reads only that position of each input (with broadcast
constants that do not vary across positions)."""
WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
SPATIAL_AXES = (2, 3)
"""NCHW: the prefix's tensors all carry height and width on these axes."""


@dataclass(frozen=True)
class Step:
    """One op's sampling along one spatial axis: output o reads inputs
    o*stride - pad_begin + j*dilation for j in 0..kernel-1."""

    kernel: int = 1
    stride: int = 1
    pad_begin: int = 0
    pad_end: int = 0
    dilation: int = 1

    @property
    def reach(self) -> int:
        return (self.kernel - 1) * self.dilation + 1

    def size(self, n: int) -> int:
        return (n + self.pad_begin + self.pad_end - self.reach) // self.stride + 1

    def forward(self, changed: Interval, n_out: int) -> Interval:
        """The outputs that read any of the `changed` inputs."""
        start, stop = changed
        if start >= stop:
            return EMPTY
        low = max(0, -((self.reach - 1 - start - self.pad_begin) // self.stride))
        high = min(n_out, (stop - 1 + self.pad_begin) // self.stride + 1)
        return (low, high) if low < high else EMPTY

    def backward(self, needed: Interval, n_in: int) -> Interval:
        """The inputs that the `needed` outputs read, a read of the padding reaching to the
        border: a crop must then meet the image's edge, where its padding is the true one."""
        start, stop = needed
        if start >= stop:
            return EMPTY
        low = min(max(0, start * self.stride - self.pad_begin), n_in - 1)
        high = max(min(n_in, (stop - 1) * self.stride - self.pad_begin + self.reach), low + 1)
        return low, high


@dataclass(frozen=True)
class LocalOp:
    """A prefix node: its inputs that depend on the image, its output, its steps per axis."""

    inputs: tuple[str, ...]
    output: str
    steps: tuple[Step, Step]
    macs: int
    """Multiply-adds of one full-size image's run."""


@dataclass(frozen=True)
class Crop:
    """Where one patch's crop lies along one axis and what it changes at the cut."""

    start: int
    """The crop's first input position (a multiple of the prefix's stride)."""
    changed: Interval
    """The cut's changed positions, in the full map's coordinates."""


@dataclass(frozen=True)
class CutPlan:
    """A cut of the graph and the crops that recompute the prefix for one window size."""

    cut: str
    input_name: str
    ops: tuple[LocalOp, ...]
    sizes: dict[str, tuple[int, int]] = field(repr=False)
    """Full-image height and width of the input and of every prefix tensor."""
    stride: tuple[int, int]
    crop: tuple[int, int]
    """The crop's height and width at the input."""
    window: int
    plain_macs: int
    """Multiply-adds of one copy through the whole model."""
    incremental_macs: int
    """Multiply-adds of one copy through the crop's prefix and the full suffix."""

    def crops(self, axis: int, starts: Iterable[int]) -> list[Crop]:
        """For windows starting at each of `starts` on `axis` (0: height, 1: width)."""
        return [self._crop(axis, int(s)) for s in starts]

    def _crop(self, axis: int, start: int) -> Crop:
        size = self.sizes[self.input_name][axis]
        changed = _forward(
            self.ops, self.sizes, self.input_name, axis, (start, start + self.window)
        )
        cut_changed = changed.get(self.cut, EMPTY)
        needed = _backward(self.ops, self.sizes, self.cut, self.input_name, axis, cut_changed)
        stride, crop = self.stride[axis], self.crop[axis]
        low = min(needed[0] // stride * stride, size - crop)
        return Crop(low, cut_changed)


def _attr(node: onnx.NodeProto, name: str) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    value = _attr(node, name)
    return int(value) if isinstance(value, int) else default


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    value = _attr(node, name)
    return [int(v) for v in value] if isinstance(value, list) else default


def _text(node: onnx.NodeProto, name: str, default: str) -> str:
    value = _attr(node, name)
    return value.decode() if isinstance(value, bytes) else default


def _same_pads(size: int, step: Step, upper: bool) -> tuple[int, int]:
    total = max(0, (math.ceil(size / step.stride) - 1) * step.stride + step.reach - size)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


def _window_steps(
    node: onnx.NodeProto, size: tuple[int, int], shapes: "Shapes"
) -> tuple[Step, Step] | None:
    # A Conv without kernel_shape takes it from its weight.
    weight = shapes.get(node.input[1], []) if node.op_type == "Conv" else []
    kernel = _ints(node, "kernel_shape", [int(d) for d in weight[2:]])
    strides = _ints(node, "strides", [1, 1])
    dilations = _ints(node, "dilations", [1, 1])
    pads = _ints(node, "pads", [0, 0, 0, 0])
    if len(kernel) != 2 or len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        return None
    if _int(node, "ceil_mode", 0):
        return None
    auto = _text(node, "auto_pad", "NOTSET")
    steps: list[Step] = []
    for axis in range(2):
        step = Step(kernel[axis], strides[axis], pads[axis], pads[axis + 2], dilations[axis])
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = _same_pads(size[axis], step, auto == "SAME_UPPER")
            step = Step(step.kernel, step.stride, begin, end, step.dilation)
        elif auto == "VALID":
            step = Step(step.kernel, step.stride, 0, 0, step.dilation)
        steps.append(step)
    return steps[0], steps[1]


Shapes = dict[str, list[int]]
"""Tensor name -> its dims (-1 where unknown), for the tensors the graph gives shapes to."""


def tensor_shapes(graph: onnx.GraphProto) -> Shapes:
    shapes: Shapes = {t.name: list(t.dims) for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shapes


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                shapes[node.output[0]] = tuple(value.dims)
    return shapes


def _constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            if isinstance(value, onnx.TensorProto):
                return numpy_helper.to_array(value)
    return None


def node_macs(shapes: Shapes, node: onnx.NodeProto) -> int:
    """Multiply-adds of Conv, Gemm and MatMul nodes (0 for other ops) at the graph's shapes."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
        return 0
    out = shapes.get(node.output[0])
    if not out or min(out[1:], default=1) <= 0:
        return 0
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        return int(np.prod(out[1:])) * int(np.prod(weight[1:])) if weight else 0
    first = shapes.get(node.input[0])
    if not first:
        return 0
    inner = first[0] if node.op_type == "Gemm" and _int(node, "transA", 0) else first[-1]
    return int(np.prod(out[1:])) * max(inner, 1)


def graph_macs(graph: onnx.GraphProto) -> int:
    """Multiply-adds of one image's run (Conv, Gemm and MatMul)."""
    shapes = tensor_shapes(graph)
    return sum(node_macs(shapes, node) for node in graph.node)


def _forward(
    ops: Iterable[LocalOp],
    sizes: dict[str, tuple[int, int]],
    input_name: str,
    axis: int,
    changed: Interval,
) -> dict[str, Interval]:
    size = sizes[input_name][axis]
    regions = {input_name: (max(0, changed[0]), min(size, changed[1]))}
    for op in ops:
        union = _union(regions.get(name, EMPTY) for name in op.inputs)
        regions[op.output] = op.steps[axis].forward(union, sizes[op.output][axis])
    return regions


def _backward(
    ops: tuple[LocalOp, ...],
    sizes: dict[str, tuple[int, int]],
    cut: str,
    input_name: str,
    axis: int,
    needed: Interval,
) -> Interval:
    regions = {cut: needed}
    for op in reversed(ops):
        wanted = regions.get(op.output, EMPTY)
        if wanted[0] >= wanted[1]:
            continue
        for name in op.inputs:
            read = op.steps[axis].backward(wanted, sizes[name][axis])
            regions[name] = _union([regions.get(name, EMPTY), read])
    return regions.get(input_name, EMPTY)


def _union(intervals: Iterable[Interval]) -> Interval:
    present = [i for i in intervals if i[0] < i[1]]
    if not present:
        return EMPTY
    return min(i[0] for i in present), max(i[1] for i in present)


def _local_op(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    dependent: set[str],
    sizes: dict[str, tuple[int, int]],
    constants: dict[str, tuple[int, ...]],
    shapes: Shapes,
) -> LocalOp | None:
    """`node` as a LocalOp, or None when the arithmetic cannot follow it."""
    inputs = tuple(name for name in node.input if name in dependent)
    if len(node.output) < 1 or not inputs:
        return None
    out_shape = shapes.get(node.output[0])
    if out_shape is None or len(out_shape) != 4 or min(out_shape[1:]) <= 0:
        return None
    if any(sizes.get(name) is None for name in inputs):
        return None
    in_size = sizes[inputs[0]]
    identity = (Step(), Step())
    if node.op_type in WINDOWED:
        if len(inputs) != 1 or node.input[0] != inputs[0]:
            return None  # a Conv whose weights depend on the image
        steps = _window_steps(node, in_size, shapes)
    elif node.op_type in POINTWISE:
        for name in node.input:
            if not name or name in dependent:
                continue
            shape = constants.get(name)
            if shape is None:
                return None
            # Right-aligned broadcast: the constant must not vary along height or width.
            aligned = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else None
            if aligned is None or aligned[2] != 1 or aligned[3] != 1:
                return None
        if any(sizes[name] != in_size for name in inputs):
            return None
        steps = identity
    elif node.op_type == "Concat":
        if _int(node, "axis", 0) not in (1, -3):
            return None
        if len(inputs) != len([n for n in node.input if n]):
            return None
        if any(sizes[name] != in_size for name in inputs):
            return None
        steps = identity
    elif node.op_type == "Pad":
        if (
            _text(node, "mode", "constant") != "constant"
            or node.input[0] != inputs[0]
            or len(inputs) != 1
        ):
            return None
        pads = _constant_value(graph, node.input[1]) if len(node.input) > 1 else None
        has_axes = len(node.input) > 3 and bool(node.input[3])
        axes = _constant_value(graph, node.input[3]) if has_axes else None
        if has_axes and axes is None:
            return None
        if pads is None or pads.min() < 0:
            return None
        extents = pad_extents(
            pads.reshape(-1).tolist(), None if axes is None else axes.reshape(-1).tolist(), 4
        )
        if extents is None:
            return None
        begin, end = extents
        if begin[0] or end[0] or begin[1] or end[1]:
            return None
        steps = (Step(1, 1, begin[2], end[2]), Step(1, 1, begin[3], end[3]))
    else:
        return None
    if steps is None:
        return None
    expected = (steps[0].size(in_size[0]), steps[1].size(in_size[1]))
    if expected != (out_shape[2], out_shape[3]):
        return None
    sizes[node.output[0]] = expected
    return LocalOp(inputs, node.output[0], steps, node_macs(shapes, node))


@dataclass(frozen=True)
class _Candidate:
    cut: str
    ops: tuple[LocalOp, ...]
    suffix_macs: int


def _candidates(
    graph: onnx.GraphProto, input_name: str
) -> tuple[list[_Candidate], dict[str, tuple[int, int]]]:
    """Tensors every path from the input passes through, each with its local prefix."""
    shapes = tensor_shapes(graph)
    shape = shapes.get(input_name)
    if shape is None or len(shape) != 4 or min(shape[2:]) <= 0:
        return [], {}
    sizes: dict[str, tuple[int, int]] = {input_name: (shape[2], shape[3])}
    constants = _constant_shapes(graph)
    dependent = {input_name}
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = index
    outputs = {o.name for o in graph.output}
    macs = [node_macs(shapes, node) for node in graph.node]
    live = {input_name}
    ops: list[LocalOp] = []
    found: list[_Candidate] = []
    for index, node in enumerate(graph.node):
        if not any(name in dependent for name in node.input):
            continue  # constants folded by hand in the graph: they live on either side
        op = _local_op(graph, node, dependent, sizes, constants, shapes)
        if op is None:
            break
        ops.append(op)
        dependent.update(node.output)
        live.update(node.output)
        live = {n for n in live if last_use.get(n, -1) > index or n in outputs}
        if len(live) == 1 and node.output[0] in live and node.output[0] not in outputs:
            found.append(_Candidate(node.output[0], tuple(ops), sum(macs[index + 1 :])))
    return found, sizes


def _crop_macs(
    ops: tuple[LocalOp, ...],
    sizes: dict[str, tuple[int, int]],
    input_name: str,
    crop: tuple[int, int],
) -> int:
    cropped = {input_name: crop}
    total = 0.0
    for op in ops:
        n = cropped[op.inputs[0]]
        out = (op.steps[0].size(n[0]), op.steps[1].size(n[1]))
        cropped[op.output] = out
        full = sizes[op.output]
        total += op.macs * (out[0] * out[1]) / (full[0] * full[1])
    return int(total)


def _crop_extent(
    ops: tuple[LocalOp, ...],
    sizes: dict[str, tuple[int, int]],
    cut: str,
    input_name: str,
    axis: int,
    window: int,
    starts: Iterable[int],
    stride: int,
) -> int | None:
    """The crop length covering the needs of windows at `starts` on `axis`."""
    size = sizes[input_name][axis]
    longest = 0
    for start in starts:
        changed = _forward(ops, sizes, input_name, axis, (start, start + window))
        needed = _backward(ops, sizes, cut, input_name, axis, changed.get(cut, EMPTY))
        if needed[0] >= needed[1]:
            continue
        longest = max(longest, needed[1] - needed[0] // stride * stride)
    # The crop can slide to the image's end only in steps of the stride.
    while longest < size and (size - longest) % stride:
        longest += 1
    return min(longest, size) or None


def _total_stride(ops: tuple[LocalOp, ...], input_name: str, cut: str, axis: int) -> int | None:
    strides = {input_name: 1}
    for op in ops:
        found = {strides[name] for name in op.inputs}
        if len(found) != 1:
            return None  # branches that sample the input on different grids
        strides[op.output] = found.pop() * op.steps[axis].stride
    return strides.get(cut)


MIN_SAVING = 0.1
"""A cut is used only when it saves at least this fraction of the multiply-adds."""


def plan_cut(
    graph: onnx.GraphProto,
    input_name: str,
    window: int,
    starts: tuple[Iterable[int], Iterable[int]],
    cut: str | None = None,
) -> CutPlan | None:
    """The cut that minimises a copy's multiply-adds for windows of side `window` whose tops
    and lefts are `starts`, or None if no cut saves enough; `cut`: that cut, saving or not."""
    starts = (tuple(int(s) for s in starts[0]), tuple(int(s) for s in starts[1]))
    candidates, sizes = _candidates(graph, input_name)
    plain = graph_macs(graph)
    best: CutPlan | None = None
    for candidate in candidates:
        if cut is not None and candidate.cut != cut:
            continue
        strides = [_total_stride(candidate.ops, input_name, candidate.cut, a) for a in range(2)]
        if strides[0] is None or strides[1] is None:
            continue
        stride = (strides[0], strides[1])
        extents = [
            _crop_extent(
                candidate.ops, sizes, candidate.cut, input_name, a, window, starts[a], stride[a]
            )
            for a in range(2)
        ]
        if extents[0] is None or extents[1] is None:
            continue
        crop = (extents[0], extents[1])
        cost = _crop_macs(candidate.ops, sizes, input_name, crop) + candidate.suffix_macs
        if best is None or cost < best.incremental_macs:
            best = CutPlan(
                cut=candidate.cut,
                input_name=input_name,
                ops=candidate.ops,
                sizes=sizes,
                stride=stride,
                crop=crop,
                window=window,
                plain_macs=plain,
                incremental_macs=cost,
            )
    if best is None or (cut is None and best.incremental_macs > (1 - MIN_SAVING) * plain):
        return None
    return best


def cut_candidates(graph: onnx.GraphProto, input_name: str) -> list[str]:
    """The tensors, in graph order, where the graph can be cut for incremental occlusion."""
    return [candidate.cut for candidate in _candidates(graph, input_name)[0]]


def split_model(
    model: onnx.ModelProto, plan: CutPlan, output_names: list[str]
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(prefix: input -> cut, taking crops of any height and width; suffix: cut -> outputs)."""
    extractor = onnx.utils.Extractor(model)
    prefix = extractor.extract_model([plan.input_name], [plan.cut])
    suffix = extractor.extract_model([plan.cut], output_names)
    graph = prefix.graph
    # The prefix runs on crops: no fixed height or width anywhere, and explicit pads (a
    # SAME pad computed on the crop would differ from the full image's).
    for info in [*graph.input, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].dim_param, dims[3].dim_param = "crop_height", "crop_width"
    del graph.value_info[:]
    by_output = {op.output: op for op in plan.ops}
    for node in graph.node:
        op = by_output.get(node.output[0]) if node.output else None
        if op is None or node.op_type not in WINDOWED:
            continue
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        height, width = op.steps
        node.attribute.append(
            helper.make_attribute(
                "pads", [height.pad_begin, width.pad_begin, height.pad_end, width.pad_end]
            )
        )
    return prefix, suffix
