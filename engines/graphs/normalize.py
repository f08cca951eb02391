"""Normalising an exported model before it is served and differentiated.

Exporters leave noise that the differentiator should never see: free height and width that the
model's config fixes, shape arithmetic on them (Shape -> Gather -> Concat -> Reshape chains,
ConstantOfShape, Range), Identity nodes and Casts to the type a tensor already has; float16
weights; a batch fixed at 1. `normalize` fixes the dims, folds every value that the fixed dims
determine into an initializer, and rewrites float16 to float32 and a fixed batch to a symbolic
one where it can. Whether the rewritten batch is right is checked by the caller, which runs it.

The folder is onnx's shape inference plus constant evaluation with onnx.reference, one node at
a time. A Shape is folded partially: its batch entry stays unknown while the entries it gives to
a Gather or Slice are static, which is what exporters compute paddings and reshapes from. (For
why not onnxruntime's basic optimizer, see the README.)
"""

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from engines.errors import UnsupportedModel
from engines.graphs.context import DEFAULT_DOMAINS, node_attribute, subgraph_reads

Array = npt.NDArray[Any]
BatchMode = Literal["free", "rewritten", "one_row"]
BATCH_DIM = "batch"
# Ops whose value may differ between runs, or that hold subgraphs: never folded.
_NOT_FOLDED = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
    "SequenceMap",
}
# Larger folded tensors stay computed: folding them would only grow the file.
_MAX_FOLDED_ELEMENTS = 1 << 16
_FLOAT_TYPES_TO_WIDEN = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
MIN_OPSET = 13
RESIZE_COORDINATES_OPSET = 11  # Resize's coordinate_transformation_mode, where Upsample ends
SCATTER_ADD_OPSET = 16  # ScatterElements(reduction="add"), which MaxPool's gradient needs
RESIZE_AXES_OPSET = 18
PAD_AXES_OPSET = 18  # Pad's `axes` input
POOLS = ("MaxPool", "AveragePool")


@dataclass
class Normalized:
    model: onnx.ModelProto
    batch: BatchMode
    """`free`: the model already had a free batch; `rewritten`: its batch of 1 was made
    symbolic (to be checked by running it); `one_row`: it stays 1, run one row per call."""


def normalize(
    model: onnx.ModelProto,
    input_name: str,
    spatial: dict[int, int],
    *,
    rewrite_batch: bool = True,
) -> Normalized:
    """A normalised copy of `model`; `spatial` maps input axes to the sizes the config fixes."""
    result = copy.deepcopy(model)
    graph = result.graph
    data_input = next((i for i in graph.input if i.name == input_name), None)
    if data_input is None:
        raise UnsupportedModel(f"the model has no input {input_name!r}")
    _fix_dims(data_input, spatial)
    _widen_to_float32(result)
    result = at_gradient_opset(result)
    graph = result.graph
    data_input = next(i for i in graph.input if i.name == input_name)
    batch: BatchMode = "free"
    if fixed_batch_of_one(data_input):
        batch = "rewritten" if rewrite_batch else "one_row"
    if batch == "rewritten":
        _make_batch_symbolic(result, input_name)
    _flatten_class_maps(result.graph)
    _batch_first_selections(result.graph)
    _separable_spatial_gathers(result.graph)
    _fold(result, input_name)
    _keep_pads_out_of_pools(result.graph)
    return Normalized(result, batch)


def _fix_dims(value: onnx.ValueInfoProto, spatial: dict[int, int]) -> None:
    dims = value.type.tensor_type.shape.dim
    for axis, size in spatial.items():
        if axis < len(dims) and not dims[axis].HasField("dim_value"):
            dims[axis].Clear()
            dims[axis].dim_value = size


def fixed_batch_of_one(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1


def opset_of(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return versions[0] if versions else 1


def at_gradient_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at an opset the backward ops exist in (>= 13; >= 16 when MaxPool is used).

    Done once here, so the forward sessions and the gradient graphs run the same graph (the
    converter renames some tensors) and layer names mean the same tensor in both.
    """
    opset = opset_of(model)
    target = max(opset, MIN_OPSET)
    if opset < SCATTER_ADD_OPSET and any(n.op_type == "MaxPool" for n in model.graph.node):
        target = SCATTER_ADD_OPSET
    if _pads_into_pools(model.graph):
        target = max(target, PAD_AXES_OPSET)
    if target == opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises assorted errors for ops it cannot map
        raise UnsupportedModel(f"cannot convert the model from opset {opset} to {target}") from exc
    if opset < RESIZE_COORDINATES_OPSET:
        _keep_asymmetric_coordinates(converted.graph)
    return converted


def _flatten_class_maps(graph: onnx.GraphProto) -> None:
    """Outputs [N, classes, 1, 1] (a convolutional head pooled without a Flatten, as in the ONNX
    model zoo's SqueezeNet) become [N, classes]: a Flatten is added under the output's name."""
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) < 3 or any(d.dim_value != 1 for d in dims[2:]):
            continue
        producer = next((n for n in graph.node if output.name in n.output), None)
        if producer is None:
            continue
        maps = output.name + "/maps"
        producer.output[list(producer.output).index(output.name)] = maps
        for node in graph.node:
            node.input[:] = [maps if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Flatten", [maps], [output.name], axis=1))
        del dims[2:]


def _pads_into_pools(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Constant-mode Pads that a pooling node reads."""
    pooled = {n.input[0] for n in graph.node if n.op_type in POOLS and n.input}
    return [
        n
        for n in graph.node
        if n.op_type == "Pad"
        and n.output[0] in pooled
        and node_attribute(n, "mode", b"constant") in (b"constant", "constant")
    ]


def _keep_pads_out_of_pools(graph: onnx.GraphProto) -> None:
    """Give each Pad a pooling node reads an explicit `axes` input (every axis, same pads).

    onnxruntime's Pad_Fusion moves a zero Pad into the MaxPool after it as the pool's own
    padding, which pads with -inf, not 0: where the input is negative at the border the map
    changes silently (ResNetV2's stem pads by 1 then pools). The rule leaves alone a Pad that
    has `axes`, and that input changes nothing else.
    """
    initializers = {t.name: t for t in graph.initializer}
    for node in _pads_into_pools(graph):
        if len(node.input) < 2 or len(node.input) > 3 or node.input[1] not in initializers:
            continue
        rank = int(np.prod(initializers[node.input[1]].dims)) // 2
        name = f"{node.output[0]}/pad_axes"
        graph.initializer.append(numpy_helper.from_array(np.arange(rank, dtype=np.int64), name))
        if len(node.input) == 2:
            node.input.append("")
        node.input.append(name)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _batch_first_selections(graph: onnx.GraphProto) -> None:
    """Keep the batch first where attention splits its fused q, k, v projections.

    `qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)` (timm's and most ViT
    blocks) exports as a Transpose that puts the batch second, read only by selections along
    axis 0: Gather of one index, or Slice or Split each followed by a Squeeze of that axis. The
    gradient rules keep the batch at axis 0, so swap the Transpose's first two output axes and
    select along axis 1: each selection's result is the same tensor as before.
    """
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_node_values(graph)
    readers = _readers(graph)
    graph_outputs = {o.name for o in graph.output}

    def ints(name: str) -> list[int] | None:
        value = _initializer_or_constant(name, initializers, constants) if name else None
        return None if value is None else [int(v) for v in value.reshape(-1)]

    def squeezes_first_axis(name: str) -> list[onnx.NodeProto] | None:
        found = readers.get(name, [])
        ok = name not in graph_outputs and all(
            n.op_type == "Squeeze"
            and n.input[0] == name
            and len(n.input) > 1
            and ints(n.input[1]) == [0]
            for n in found
        )
        return found if ok else None

    def selection(node: onnx.NodeProto, reader: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """The squeezes after `reader`, if it selects along axis 0 of `node`'s output alone."""
        if reader.domain not in DEFAULT_DOMAINS or reader.input[0] != node.output[0]:
            return None
        if reader.input[1:].count(node.output[0]):
            return None
        if reader.op_type == "Gather":
            index = _initializer_or_constant(reader.input[1], initializers, constants)
            scalar = index is not None and index.ndim == 0
            return [] if scalar and int(node_attribute(reader, "axis", 0)) == 0 else None
        if reader.op_type == "Slice":
            axes = ints(reader.input[3]) if len(reader.input) > 3 else [0]
            return squeezes_first_axis(reader.output[0]) if axes == [0] else None
        if reader.op_type == "Split" and int(node_attribute(reader, "axis", 0)) == 0:
            squeezes = [squeezes_first_axis(o) for o in reader.output]
            return None if None in squeezes else [n for s in squeezes if s for n in s]
        return None

    second_axis = "batch_first/axis_1"
    for node in graph.node:
        perm = list(node_attribute(node, "perm", []))
        if node.op_type != "Transpose" or len(perm) < 2 or perm[1] != 0:
            continue
        reads = readers.get(node.output[0], [])
        plans = [selection(node, reader) for reader in reads]
        if not reads or node.output[0] in graph_outputs or any(p is None for p in plans):
            continue
        if second_axis not in initializers:
            axis_1 = numpy_helper.from_array(np.array([1], np.int64), second_axis)
            graph.initializer.append(axis_1)
            initializers[second_axis] = axis_1
        node.attribute.remove(next(a for a in node.attribute if a.name == "perm"))
        node.attribute.append(helper.make_attribute("perm", [perm[1], perm[0], *perm[2:]]))
        for reader, squeezes in zip(reads, plans, strict=True):
            assert squeezes is not None
            if reader.op_type == "Slice":
                while len(reader.input) < 4:
                    reader.input.append("")
                reader.input[3] = second_axis
            else:
                _set_attribute(reader, "axis", None)
                reader.attribute.append(helper.make_attribute("axis", 1))
            for squeeze in squeezes:
                squeeze.input[1] = second_axis
    del graph.value_info[:]


def _separable_spatial_gathers(graph: onnx.GraphProto) -> None:
    """Gather rows then columns where an exporter gathers (row, column) pairs with the batch
    moved back.

    The dynamo exporter writes adaptive average pooling to sizes that do not divide the map
    (AlexNet's 6x6 from 1x1) as Transpose(x, [2, 3, 0, 1]) -> GatherND of (h, w) index pairs
    [*G, 2] -> Transpose that puts N, C first again. When the pairs' rows depend on the
    leading axes of G only and their columns on the rest (a grid), that is Gather(x, rows,
    axis=2) -> Gather(., columns, axis=2 + len(rows.shape)): the same tensor, batch first.
    """
    initializers = {t.name: t for t in graph.initializer}
    constants = _constant_node_values(graph)
    producers = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    graph_outputs = {o.name for o in graph.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for gather in graph.node:
        if gather.op_type != "GatherND" or int(node_attribute(gather, "batch_dims", 0)) != 0:
            continue
        front = producers.get(gather.input[0])
        after = readers.get(gather.output[0], [])
        indices = _initializer_or_constant(gather.input[1], initializers, constants)
        if front is None or front.op_type != "Transpose" or len(after) != 1 or indices is None:
            continue
        back = after[0]
        grid = indices.shape[:-1]
        if list(node_attribute(front, "perm", [])) != [2, 3, 0, 1] or indices.shape[-1] != 2:
            continue
        rank = len(grid)
        if back.op_type != "Transpose" or list(node_attribute(back, "perm", [])) != [
            rank,
            rank + 1,
            *range(rank),
        ]:
            continue
        if {gather.output[0], front.output[0]} & graph_outputs or len(
            readers.get(front.output[0], [])
        ) != 1:
            continue
        split = _grid_split(indices)
        if split is None:
            continue
        rows = indices[(..., 0)][(slice(None),) * split + (0,) * (rank - split)]
        columns = indices[(..., 1)][(0,) * split]
        out = back.output[0]
        names = [f"{out}/rows", f"{out}/columns", f"{out}/by_rows"]
        for name, value in zip(names, (rows, columns), strict=False):
            graph.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
        replaced[id(back)] = [
            helper.make_node("Gather", [front.input[0], names[0]], [names[2]], axis=2),
            helper.make_node("Gather", [names[2], names[1]], [out], axis=2 + split),
        ]
    if not replaced:
        return
    kept = [n for node in graph.node for n in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unread(graph)


def _grid_split(indices: Array) -> int | None:
    """s where [*G, 2] index pairs are a grid: rows vary along G's first s axes only, columns
    along the rest only."""
    rank = indices.ndim - 1
    rows, columns = indices[..., 0], indices[..., 1]
    for split in range(rank + 1):
        rows_ok = all(np.ptp(rows, axis=a).max(initial=0) == 0 for a in range(split, rank))
        columns_ok = all(np.ptp(columns, axis=a).max(initial=0) == 0 for a in range(split))
        if rows_ok and columns_ok:
            return split
    return None


def _keep_asymmetric_coordinates(graph: onnx.GraphProto) -> None:
    """Upsample and Resize-10 sample at x_out / scale; onnx's converter gives the Resizes it
    makes of them (every Resize of a model below opset 11) the half_pixel default, which moves
    every linear sample. Put it back."""
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        _set_attribute(node, "coordinate_transformation_mode", "asymmetric")
        if node_attribute(node, "mode", b"nearest") in (b"nearest", "nearest"):
            _set_attribute(node, "nearest_mode", "floor")


def _set_attribute(node: onnx.NodeProto, name: str, value: str | None) -> None:
    """Give the node attribute `name` the value, or remove it (None)."""
    kept = [a for a in node.attribute if a.name != name]
    if value is not None:
        kept.append(helper.make_attribute(name, value))
    del node.attribute[:]
    node.attribute.extend(kept)


# --- the batch -------------------------------------------------------------------------------


def _make_batch_symbolic(model: onnx.ModelProto, input_name: str) -> None:
    """Declare the batch free and let reshapes keep whatever batch they are given.

    A constant Reshape target that starts with the batch (1) copies its input's first dim
    instead (0); everything else an exporter baked the batch into makes the check fail.
    """
    graph = model.graph
    for value in [*(i for i in graph.input if i.name == input_name), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    del graph.value_info[:]
    initializers = {i.name: i for i in graph.initializer}
    constants = _constant_node_values(graph)
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        shape_name = node.input[1]
        value = _initializer_or_constant(shape_name, initializers, constants)
        if value is None or value.ndim != 1 or value.size == 0 or int(value[0]) != 1:
            continue
        if int(node_attribute(node, "allowzero", 0)):
            if 0 in value.tolist():
                continue  # a literal 0 size: leave it, the batch check will tell
            # No zero in the target: allowzero changes nothing, and 0 must mean "copy" now.
            _set_attribute(node, "allowzero", None)
        new_shape = value.copy()
        new_shape[0] = 0
        new_name = f"{shape_name}/any_batch"
        if new_name not in initializers:
            tensor = numpy_helper.from_array(new_shape.astype(np.int64), new_name)
            graph.initializer.append(tensor)
            initializers[new_name] = tensor
        node.input[1] = new_name


def _initializer_or_constant(
    name: str, initializers: dict[str, onnx.TensorProto], constants: dict[str, Array]
) -> Array | None:
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    return constants.get(name)


# --- float16 ---------------------------------------------------------------------------------


def _widen_to_float32(model: onnx.ModelProto) -> None:
    """Rewrite float16/bfloat16 tensors, constants and casts to float32."""
    graph = model.graph
    changed = False
    for value in [*graph.input, *graph.output, *graph.value_info]:
        tensor = value.type.tensor_type
        if tensor.elem_type in _FLOAT_TYPES_TO_WIDEN:
            tensor.elem_type = TensorProto.FLOAT
            changed = True
    for index, init in enumerate(graph.initializer):
        if init.data_type in _FLOAT_TYPES_TO_WIDEN:
            array = numpy_helper.to_array(init).astype(np.float32)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, init.name))
            changed = True
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and (
                attribute.t.data_type in _FLOAT_TYPES_TO_WIDEN
            ):
                array = numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
                changed = True
            elif (
                attribute.name in ("to", "dtype")
                and attribute.type == onnx.AttributeProto.INT
                and attribute.i in _FLOAT_TYPES_TO_WIDEN
            ):
                attribute.i = TensorProto.FLOAT
                changed = True
    if changed:
        del graph.value_info[:]


# --- folding ---------------------------------------------------------------------------------


def _constant_node_values(graph: onnx.GraphProto) -> dict[str, Array]:
    values: dict[str, Array] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
            values[node.output[0]] = _constant_value(node)
    return values


def _constant_value(node: onnx.NodeProto) -> Array:
    attribute = node.attribute[0]
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return numpy_helper.to_array(value)
    if attribute.name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if attribute.name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    raise UnsupportedModel(f"Constant node {node.name!r} holds a {attribute.name}")


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


@dataclass(frozen=True)
class _BatchIndex:
    """An integer tensor [N, ...] equal to `scale * n + offset` at batch row n (`offset`: a
    constant of shape [1, ...]): what dynamo's as_strided writes to index a flattened batch."""

    scale: int
    offset: Array


Entry = int | str | None
"""An entry of a partly known shape vector: a size, BATCH_ENTRY (the input's batch), unknown."""
BATCH_ENTRY = "batch"


class _Folder:
    """Known values of one graph: constants, and shape vectors some of whose entries are known.

    A shape vector's entry that is the model's batch is kept as BATCH_ENTRY, so that a Reshape
    to [batch, *static] can become a constant [0, *static] (0: keep the input's first dim).
    """

    def __init__(self, model: onnx.ModelProto, input_name: str) -> None:
        self.model = model
        graph = model.graph
        self.values: dict[str, Array] = {
            i.name: numpy_helper.to_array(i) for i in graph.initializer
        }
        self.values.update(_constant_node_values(graph))
        self.partial: dict[str, list[Entry]] = {}
        self.scalars: dict[str, Entry] = {}  # 0-d partial values, e.g. Gather(Shape(x), 0)
        self.batch_indices: dict[str, _BatchIndex] = {}
        self.added: list[onnx.TensorProto] = []
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> the nodes in its place
        self.batches_kept = 0  # Reshapes `_keep_batch` rewrote
        self.producers = {o: n for n in graph.node for o in n.output if o}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:  # shape inference raises for models it finds inconsistent
            raise UnsupportedModel(f"shape inference failed on the model: {exc}") from exc
        self.shapes: dict[str, list[int | None]] = {}
        self.first_dims: dict[str, str] = {}  # tensor -> the dim_param of its axis 0
        self.elem_types: dict[str, int] = {}
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            self.elem_types[value.name] = value.type.tensor_type.elem_type
            dims = _dims(value)
            if dims is not None:
                self.shapes[value.name] = dims
            declared = value.type.tensor_type.shape.dim
            if declared and declared[0].dim_param:
                self.first_dims[value.name] = declared[0].dim_param
        self.opset = opset_of(model)
        self.batch_param = self.first_dims.get(input_name)
        self.value_info = [copy.deepcopy(v) for v in inferred.graph.value_info]
        if self.batch_param is not None:
            self._batch_from_concrete_batches(input_name)

    def _batch_from_concrete_batches(self, input_name: str) -> None:
        """A tensor that shape inference finds [1, rows] at batch 1 and [2, rows] at batch 2
        has the batch at axis 0, and static rows: its value info says so.

        Symbolic inference gives the batch a fresh symbol after a Resize, a Reshape to -1 and
        every broadcast that meets such a symbol, and leaves unknown the sizes computed from a
        batch times something (MobileViT's patches, [B * C * h, w, ...]); the rewrites here and
        the gradient rules need both.
        """
        light = _without_weights(self.model)
        one, two = (_dims_at_batch(light, input_name, b) for b in (1, 2))
        for value in self.value_info:
            dims = value.type.tensor_type.shape.dim
            at_one, at_two = one.get(value.name), two.get(value.name)
            if not dims or at_one is None or at_two is None:
                continue
            if not len(at_one) == len(at_two) == len(dims):
                continue
            for axis in range(1, len(dims)):
                if not dims[axis].HasField("dim_value") and at_one[axis] == at_two[axis]:
                    dims[axis].Clear()
                    dims[axis].dim_value = at_one[axis]
            batch_first = (at_one[0], at_two[0]) == (1, 2) and at_one[1:] == at_two[1:]
            if batch_first and not dims[0].HasField("dim_value"):
                dims[0].Clear()
                dims[0].dim_param = str(self.batch_param)
                self.first_dims[value.name] = str(self.batch_param)
            self.shapes[value.name] = _dims(value) or []

    def fold(self, node: onnx.NodeProto) -> list[Array] | None:
        """The node's outputs if they are known constants, else None (partial values noted)."""
        if node.domain not in DEFAULT_DOMAINS or node.op_type in _NOT_FOLDED:
            return None
        if node.op_type == "Shape":
            return self._shape(node)
        if node.op_type == "Gather" and self._gather_within_rows(node):
            return None
        if node.op_type == "Size":
            dims = self.shapes.get(node.input[0])
            static = [d for d in dims or [] if d is not None]
            if dims is None or len(static) != len(dims):
                return None
            return [np.array(int(np.prod(static)), np.int64)]
        inputs = [n for n in node.input if n]
        if all(name in self.values for name in inputs):
            return self._evaluate(node)
        if node.op_type == "Reshape":
            self._keep_batch(node)
            return None
        if node.op_type == "Resize":
            self._resize_without_batch(node)
            return None
        if self._track_batch_index(node):
            return None
        return self._propagate_partial(node)

    def _track_batch_index(self, node: onnx.NodeProto) -> bool:
        """Follow Range(0, batch) through Mul/Add/Unsqueeze/Cast; rewrite the Gather that reads
        a flattened batch with it as a Gather within each row. True if the node was handled."""
        op, inputs = node.op_type, list(node.input)
        if op == "Range" and len(inputs) == 3 and self.scalars.get(inputs[1]) == BATCH_ENTRY:
            start, delta = self.values.get(inputs[0]), self.values.get(inputs[2])
            if start is None or delta is None or int(start) != 0 or int(delta) != 1:
                return False
            self.batch_indices[node.output[0]] = _BatchIndex(1, np.zeros([1], np.int64))
            return True
        tracked = [self.batch_indices.get(name) for name in inputs]
        index = next((t for t in tracked if t is not None), None)
        if index is None:
            return False
        if op in ("Cast", "Identity"):
            self.batch_indices[node.output[0]] = index
            return True
        if op == "Unsqueeze":
            axes = self.values.get(inputs[1]) if len(inputs) > 1 else None
            listed = node_attribute(node, "axes", None) if axes is None else axes.reshape(-1)
            rank = index.offset.ndim + (0 if listed is None else len(listed))
            if listed is None or any(int(a) % rank == 0 for a in listed):
                return False
            offset = np.expand_dims(index.offset, tuple(int(a) % rank for a in listed))
            self.batch_indices[node.output[0]] = _BatchIndex(index.scale, offset)
            return True
        other = [
            self.values.get(name) for name, t in zip(inputs, tracked, strict=True) if t is None
        ]
        if op not in ("Add", "Mul") or len(inputs) != 2 or len(other) != 1 or other[0] is None:
            return False
        constant = other[0].astype(np.int64)
        if op == "Mul":
            if constant.size != 1:
                return False
            factor = int(constant.reshape(-1)[0])
            result = _BatchIndex(index.scale * factor, index.offset * factor)
        else:
            offset = index.offset + constant
            if offset.ndim != index.offset.ndim or offset.shape[0] != 1:
                return False
            result = _BatchIndex(index.scale, offset)
        self.batch_indices[node.output[0]] = result
        return True

    def _gather_within_rows(self, node: onnx.NodeProto) -> bool:
        """Gather(Reshape(x, [-1]), scale * n + offset) with scale = x's row size and every
        offset inside a row: Gather(Reshape(x, [0, -1]), offset, axis=1), reshaped."""
        if len(node.input) != 2 or int(node_attribute(node, "axis", 0)) != 0:
            return False
        index = self.batch_indices.get(node.input[1])
        flatten = self.producers.get(node.input[0])
        if index is None or flatten is None or flatten.op_type != "Reshape":
            return False
        target = self.values.get(flatten.input[1]) if len(flatten.input) > 1 else None
        source = flatten.input[0]
        dims = self.shapes.get(source)
        if target is None or target.reshape(-1).tolist() != [-1] or not self._is_batch(source):
            return False
        if dims is None or any(d is None for d in dims[1:]):
            return False
        row = int(np.prod([d for d in dims[1:] if d is not None]))
        offsets = index.offset.reshape(-1)
        if index.scale != row or offsets.min() < 0 or offsets.max() >= row:
            return False
        out = node.output[0]
        rows = self._constant(f"{out}/rows_shape", np.array([0, -1], np.int64))
        picks = self._constant(f"{out}/row_offsets", offsets.astype(np.int64))
        shape = self._constant(f"{out}/shape", np.array([0, *index.offset.shape[1:]], np.int64))
        self.replaced[id(node)] = [
            helper.make_node("Reshape", [source, rows], [f"{out}/rows"]),
            helper.make_node("Gather", [f"{out}/rows", picks], [f"{out}/picked"], axis=1),
            helper.make_node("Reshape", [f"{out}/picked", shape], [out], name=node.name),
        ]
        return True

    def _resize_without_batch(self, node: onnx.NodeProto) -> None:
        """Resize to sizes [batch of x, static...]: the same sizes on the other axes only
        (Resize's `axes`, opset 18) or, below 18, the scales they mean when those are exact."""
        sizes = self.partial.get(node.input[3]) if len(node.input) > 3 else None
        dims = self.shapes.get(node.input[0])
        if sizes is None or dims is None or node_attribute(node, "axes", None) is not None:
            return
        rest = sizes[1:]
        if sizes[0] != BATCH_ENTRY or not self._is_batch(node.input[0]):
            return
        static = [d for d in dims[1:] if d is not None]
        if len(rest) != len(static) or len(static) != len(dims) - 1:
            return
        outputs = [int(d) for d in rest if isinstance(d, int)]
        if len(outputs) != len(rest):
            return
        if self.opset >= RESIZE_AXES_OPSET:
            name = self._constant(f"{node.input[3]}/without_batch", np.array(outputs, np.int64))
            node.input[3] = name
            node.attribute.append(helper.make_attribute("axes", list(range(1, len(dims)))))
            return
        scales = np.array([1.0, *(o / i for o, i in zip(outputs, static, strict=True))], np.float32)
        exact = all(
            int(np.floor(np.float32(i) * scale)) == o
            for i, o, scale in zip(static, outputs, scales[1:], strict=True)
        )
        if exact:
            name = self._constant(f"{node.input[3]}/as_scales", scales)
            del node.input[2:]
            node.input.append(name)

    def _constant(self, name: str, value: Array) -> str:
        if name not in self.values:
            self.values[name] = value
            self.added.append(numpy_helper.from_array(value, name))
        return name

    def _is_batch(self, name: str) -> bool:
        return self.batch_param is not None and self.first_dims.get(name) == self.batch_param

    def _keep_batch(self, node: onnx.NodeProto) -> None:
        """Reshape(x, [batch of x, static...]) reads its target as the constant [0, static...].

        So does a constant [-1, static...] whose static part is x's row size: shape inference
        then carries the batch's symbol through it (a -1 gets a fresh one), and so can
        onnxruntime, which keeps the gradients in its blocked layout only when it can prove
        their shapes equal the forward's (saliency on a dynamo MobileNetV2: 10.9 -> ~8.3 ms).
        """
        target = self.partial.get(node.input[1])
        if target is None:
            constant = self.values.get(node.input[1])
            target = _row_reshape(constant, self.shapes.get(node.input[0]))
        if target is None or target[0] != BATCH_ENTRY or not self._is_batch(node.input[0]):
            return
        rest = target[1:]
        if not all(isinstance(d, int) for d in rest) or 0 in rest:
            return  # (a 0 there would copy another dim, not mean a size of 0)
        # allowzero makes a 0 literal; with no 0 in the target it changed nothing until now.
        _set_attribute(node, "allowzero", None)
        node.input[1] = self._constant(
            f"{node.input[1]}/keep_batch", np.array([0, *rest], np.int64)
        )
        self.batches_kept += 1

    def _shape(self, node: onnx.NodeProto) -> list[Array] | None:
        dims = self.shapes.get(node.input[0])
        if dims is None:
            return None
        start = int(node_attribute(node, "start", 0))
        end = node_attribute(node, "end", None)
        entries: list[Entry] = list(dims)
        if dims and dims[0] is None and self._is_batch(node.input[0]):
            entries[0] = BATCH_ENTRY
        picked = entries[start:] if end is None else entries[start : int(end)]
        if all(isinstance(d, int) for d in picked):
            return [np.array(picked, np.int64)]
        self.partial[node.output[0]] = picked
        return None

    def _vector(self, name: str) -> list[Entry] | None:
        if name in self.partial:
            return self.partial[name]
        value = self.values.get(name)
        if value is not None and value.ndim <= 1 and value.dtype.kind == "i":
            return [int(v) for v in value.reshape(-1)]
        return None

    def _propagate_partial(self, node: onnx.NodeProto) -> list[Array] | None:
        """Gather/Slice/Concat/Unsqueeze/Cast of partly known shape vectors: the known entries
        carry on; the outputs if they become fully known."""
        op = node.op_type
        out = node.output[0] if node.output else ""
        picked: list[Entry] | None = None
        if op == "Gather" and node.input[0] in self.partial:
            indices = self.values.get(node.input[1])
            if indices is None or int(node_attribute(node, "axis", 0)) != 0:
                return None
            vector = self.partial[node.input[0]]
            picked = [vector[int(i)] for i in indices.reshape(-1)]
            if indices.ndim == 0:
                return self._known_scalar(out, picked[0])
            if indices.ndim != 1:
                return None
        elif op == "Slice" and node.input[0] in self.partial and len(node.input) >= 3:
            bounds = [self.values.get(n) if n else None for n in node.input[1:5]]
            if any(b is None for b, n in zip(bounds, node.input[1:5], strict=True) if n):
                return None
            starts, ends, axes, steps = [*bounds, None, None][:4]
            if axes is not None and axes.reshape(-1).tolist() not in ([0], [-1]):
                return None
            if starts is None or ends is None:
                return None
            step = 1 if steps is None else int(steps.reshape(-1)[0])
            vector = self.partial[node.input[0]]
            picked = vector[int(starts.reshape(-1)[0]) : int(ends.reshape(-1)[0]) : step]
        elif op == "Unsqueeze" and node.input[0] in self.scalars:
            axes = self.values.get(node.input[1]) if len(node.input) > 1 else None
            listed = node_attribute(node, "axes", None) if axes is None else axes.reshape(-1)
            if listed is None or [int(a) for a in listed] not in ([0], [-1]):
                return None
            picked = [self.scalars[node.input[0]]]
        elif op == "Concat":
            vectors = [self._vector(n) for n in node.input]
            if any(v is None for v in vectors):
                return None
            picked = [d for v in vectors if v is not None for d in v]
        elif op in ("Cast", "Identity") and node.input[0] in self.partial:
            picked = self.partial[node.input[0]]
        elif op in ("Cast", "Identity", "Squeeze") and node.input[0] in self.scalars:
            return self._known_scalar(out, self.scalars[node.input[0]])
        elif op == "Squeeze" and len(self.partial.get(node.input[0], [])) == 1:
            return self._known_scalar(out, self.partial[node.input[0]][0])
        if picked is None:
            return None
        if all(isinstance(d, int) for d in picked):
            return [np.array(picked, np.int64)]
        self.partial[out] = picked
        return None

    def _known_scalar(self, name: str, entry: Entry) -> list[Array] | None:
        if isinstance(entry, int):
            return [np.array(entry, np.int64)]
        self.scalars[name] = entry
        return None

    def _evaluate(self, node: onnx.NodeProto) -> list[Array] | None:
        inputs = [n for n in node.input if n]
        graph = helper.make_graph(
            [node],
            "fold",
            [
                helper.make_tensor_value_info(
                    n, helper.np_dtype_to_tensor_dtype(self.values[n].dtype), None
                )
                for n in dict.fromkeys(inputs)
            ],
            [onnx.ValueInfoProto(name=o) for o in node.output if o],
        )
        single = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        single.ir_version = self.model.ir_version
        try:
            results: Any = ReferenceEvaluator(single).run(
                None, {n: self.values[n] for n in dict.fromkeys(inputs)}
            )
        except Exception:  # an op the reference cannot run: leave the node computed
            return None
        arrays = [np.asarray(r) for r in results]
        if any(a.size > _MAX_FOLDED_ELEMENTS for a in arrays):
            return None
        return arrays


def _row_reshape(target: Array | None, dims: list[int | None] | None) -> list[Entry] | None:
    """[BATCH_ENTRY, static...] for a constant Reshape target [-1, static...] whose static
    part holds exactly one row of a [batch, static...] input."""
    if target is None or target.ndim != 1 or target.size < 2 or int(target[0]) != -1:
        return None
    rest = [int(d) for d in target[1:]]
    if dims is None or any(d is None for d in dims[1:]) or min(rest) <= 0:
        return None
    row = int(np.prod([d for d in dims[1:] if d is not None]))
    return [BATCH_ENTRY, *rest] if int(np.prod(rest)) == row else None


def _fold(model: onnx.ModelProto, input_name: str, passes: int = 64) -> None:
    """Fold constants in place until nothing changes.

    Each pass folds what one shape inference tells; a Reshape folded in one pass can make the
    shapes after it static for the next (channel shuffles chain dozens of them), and one made
    to keep the batch lets the next pass see the batch after it."""
    for _ in range(passes):
        if not _fold_once(model, input_name):
            break
    # Declare the shapes, with the batch's symbol wherever the batch is axis 0, so that every
    # later shape inference (layers, gradient rules) sees one batch.
    model.graph.value_info.extend(_Folder(model, input_name).value_info)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference alone: large float initializers become inputs of their shape
    (no copy of the weights); integer and small ones stay for the shape arithmetic."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    inputs = {i.name for i in model.graph.input}
    for weight in model.graph.initializer:
        if weight.data_type in (TensorProto.INT64, TensorProto.INT32) or (
            int(np.prod(weight.dims)) <= _MAX_FOLDED_ELEMENTS  # Resize's scales, among them
            and weight.data_location != TensorProto.EXTERNAL
        ):
            graph.initializer.append(weight)
        elif weight.name not in inputs:
            graph.input.append(
                helper.make_tensor_value_info(weight.name, weight.data_type, weight.dims)
            )
    return light


def _dims_at_batch(light: onnx.ModelProto, input_name: str, batch: int) -> dict[str, list[int]]:
    """Every tensor's static dims, as shape inference finds them with the batch set on
    `light` (a `_without_weights` copy, whose input it changes)."""
    for value in light.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == input_name and dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # onnx raises several types for models it finds inconsistent
        return {}
    found: dict[str, list[int]] = {}
    for value in inferred.graph.value_info:
        dims = _dims(value)
        if dims is not None and all(d is not None for d in dims):
            found[value.name] = [d for d in dims if d is not None]
    return found


def _fold_once(model: onnx.ModelProto, input_name: str) -> int:
    """One pass; returns how many nodes went or were rewritten."""
    graph = model.graph
    folder = _Folder(model, input_name)
    protected = {o.name for o in graph.output} | {
        name for node in graph.node for name in subgraph_reads(node)
    }
    kept: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []
    renames: dict[str, str] = {}
    removed = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            kept.append(node)
            continue
        if any(o in protected for o in node.output):
            kept.append(node)
            continue
        if _is_identity(node, folder):
            renames[node.output[0]] = node.input[0]
            removed += 1
            continue
        values = folder.fold(node)
        if id(node) in folder.replaced:
            kept.extend(folder.replaced[id(node)])
            removed += 1
            continue
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values, strict=False):
            if name:
                folder.values[name] = value
                new_initializers.append(numpy_helper.from_array(value, name))
        removed += 1
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend([*new_initializers, *folder.added])
    removed += _drop_unread(graph)
    del graph.value_info[:]
    return removed + folder.batches_kept


def _is_identity(node: onnx.NodeProto, folder: _Folder) -> bool:
    """Identity, inference-mode Dropout, and a Cast to the type its input already has."""
    if node.domain not in DEFAULT_DOMAINS or not node.input or len(node.output) != 1:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        return len(node.input) < 3
    if node.op_type == "Cast":
        source = folder.elem_types.get(node.input[0], TensorProto.UNDEFINED)
        return source != TensorProto.UNDEFINED and source == int(node_attribute(node, "to", 0))
    return False


def _drop_unread(graph: onnx.GraphProto) -> int:
    """Remove nodes and initializers nothing reads (subgraphs' outer reads included); return
    how many nodes went."""
    needed = {o.name for o in graph.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))
    live.reverse()
    dropped = len(graph.node) - len(live)
    del graph.node[:]
    graph.node.extend(live)
    kept = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return dropped
