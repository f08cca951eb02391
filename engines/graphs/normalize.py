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
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class Normalized:
    model: onnx.ModelProto
    batch: BatchMode
    """`free`: the model already had a free batch; `rewritten`: its batch of 1 was made
    symbolic (to be checked by running it); `one_row`: it stays 1, run one row per call."""
    folded: int = 0
    """Nodes replaced by constants or removed."""
    widened: bool = False
    """float16/bfloat16 tensors were rewritten to float32."""
    notes: list[str] = field(default_factory=list)


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
    widened = _widen_to_float32(result)
    result = at_gradient_opset(result)
    graph = result.graph
    data_input = next(i for i in graph.input if i.name == input_name)
    batch: BatchMode = "free"
    if _fixed_batch_of_one(data_input):
        batch = "rewritten" if rewrite_batch else "one_row"
    if batch == "rewritten":
        _make_batch_symbolic(result, input_name)
    folded = _fold(result)
    return Normalized(result, batch, folded, widened)


def _fix_dims(value: onnx.ValueInfoProto, spatial: dict[int, int]) -> None:
    dims = value.type.tensor_type.shape.dim
    for axis, size in spatial.items():
        if axis < len(dims) and not dims[axis].HasField("dim_value"):
            dims[axis].Clear()
            dims[axis].dim_value = size


def _fixed_batch_of_one(value: onnx.ValueInfoProto) -> bool:
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
    if target == opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises assorted errors for ops it cannot map
        raise UnsupportedModel(f"cannot convert the model from opset {opset} to {target}") from exc
    if opset < RESIZE_COORDINATES_OPSET:
        _keep_asymmetric_coordinates(converted.graph)
    return converted


def _keep_asymmetric_coordinates(graph: onnx.GraphProto) -> None:
    """Upsample and Resize-10 sample at x_out / scale; onnx's converter gives the Resizes it
    makes of them (every Resize of a model below opset 11) the half_pixel default, which moves
    every linear sample. Put it back."""
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        kept = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode",)]
        kept.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if node_attribute(node, "mode", b"nearest") in (b"nearest", "nearest"):
            kept = [a for a in kept if a.name != "nearest_mode"]
            kept.append(helper.make_attribute("nearest_mode", "floor"))
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
        new_shape = value.copy()
        new_shape[0] = 0
        new_name = f"{shape_name}/any_batch"
        if new_name not in initializers:
            tensor = numpy_helper.from_array(new_shape.astype(np.int64), new_name)
            graph.initializer.append(tensor)
            initializers[new_name] = tensor
        node.input[1] = new_name
        if int(node_attribute(node, "allowzero", 0)):
            raise UnsupportedModel(f"Reshape node {node.name!r} sets allowzero")


def _initializer_or_constant(
    name: str, initializers: dict[str, onnx.TensorProto], constants: dict[str, Array]
) -> Array | None:
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    return constants.get(name)


# --- float16 ---------------------------------------------------------------------------------


def _widen_to_float32(model: onnx.ModelProto) -> bool:
    """Rewrite float16/bfloat16 tensors, constants and casts to float32; True if any were."""
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
    return changed


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


class _Folder:
    """Known values of one graph: constants, and shape vectors some of whose entries are known."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.values: dict[str, Array] = {
            i.name: numpy_helper.to_array(i) for i in graph.initializer
        }
        self.values.update(_constant_node_values(graph))
        self.partial: dict[str, list[int | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:  # shape inference raises for models it finds inconsistent
            raise UnsupportedModel(f"shape inference failed on the model: {exc}") from exc
        self.shapes: dict[str, list[int | None]] = {}
        self.elem_types: dict[str, int] = {}
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            self.elem_types[value.name] = value.type.tensor_type.elem_type
            dims = _dims(value)
            if dims is not None:
                self.shapes[value.name] = dims
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 13
        )

    def fold(self, node: onnx.NodeProto) -> list[Array] | None:
        """The node's outputs if they are known constants, else None (partial values noted)."""
        if node.domain not in DEFAULT_DOMAINS or node.op_type in _NOT_FOLDED:
            return None
        if node.op_type == "Shape":
            return self._shape(node)
        if node.op_type == "Size":
            dims = self.shapes.get(node.input[0])
            static = [d for d in dims or [] if d is not None]
            if dims is None or len(static) != len(dims):
                return None
            return [np.array(int(np.prod(static)), np.int64)]
        inputs = [n for n in node.input if n]
        if all(name in self.values for name in inputs):
            return self._evaluate(node)
        self._propagate_partial(node)
        return None

    def _shape(self, node: onnx.NodeProto) -> list[Array] | None:
        dims = self.shapes.get(node.input[0])
        if dims is None:
            return None
        start = int(node_attribute(node, "start", 0))
        end = node_attribute(node, "end", None)
        picked = dims[start:] if end is None else dims[start : int(end)]
        if all(d is not None for d in picked):
            return [np.array(picked, np.int64)]
        self.partial[node.output[0]] = list(picked)
        return None

    def _vector(self, name: str) -> list[int | None] | None:
        if name in self.partial:
            return self.partial[name]
        value = self.values.get(name)
        if value is not None and value.ndim <= 1 and value.dtype.kind == "i":
            return [int(v) for v in value.reshape(-1)]
        return None

    def _propagate_partial(self, node: onnx.NodeProto) -> None:
        """Gather/Slice/Concat/Cast of partly known shape vectors: the known entries carry on."""
        op = node.op_type
        out = node.output[0] if node.output else ""
        if op == "Gather" and node.input[0] in self.partial:
            indices = self.values.get(node.input[1])
            if indices is None or int(node_attribute(node, "axis", 0)) != 0:
                return
            vector = self.partial[node.input[0]]
            picked = [vector[int(i)] for i in indices.reshape(-1)]
            if all(v is not None for v in picked):
                self._set(node, [np.array(picked, np.int64).reshape(indices.shape)])
            elif indices.ndim == 1:
                self.partial[out] = picked
        elif op == "Slice" and node.input[0] in self.partial and len(node.input) >= 3:
            bounds = [self.values.get(n) if n else None for n in node.input[1:5]]
            if any(b is None for b, n in zip(bounds, node.input[1:5], strict=True) if n):
                return
            starts, ends, axes, steps = [*bounds, None, None][:4]
            if axes is not None and axes.reshape(-1).tolist() not in ([0], [-1]):
                return
            if starts is None or ends is None:
                return
            step = 1 if steps is None else int(steps.reshape(-1)[0])
            vector = self.partial[node.input[0]]
            picked = vector[int(starts.reshape(-1)[0]) : int(ends.reshape(-1)[0]) : step]
            if all(v is not None for v in picked):
                self._set(node, [np.array(picked, np.int64)])
            else:
                self.partial[out] = picked
        elif op == "Concat":
            vectors = [self._vector(n) for n in node.input]
            if all(v is not None for v in vectors):
                self.partial[out] = [d for v in vectors if v is not None for d in v]
        elif op in ("Cast", "Identity") and node.input[0] in self.partial:
            self.partial[out] = self.partial[node.input[0]]

    def _set(self, node: onnx.NodeProto, outputs: Sequence[Array]) -> None:
        for name, value in zip(node.output, outputs, strict=False):
            self.values[name] = value

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


def _fold(model: onnx.ModelProto, passes: int = 4) -> int:
    """Fold constants in place until nothing changes; return how many nodes went."""
    total = 0
    for _ in range(passes):
        removed = _fold_once(model)
        total += removed
        if not removed:
            break
    return total


def _fold_once(model: onnx.ModelProto) -> int:
    graph = model.graph
    folder = _Folder(model)
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
    graph.initializer.extend(new_initializers)
    _drop_unread(graph)
    del graph.value_info[:]
    return removed


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


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads (subgraphs' outer reads included)."""
    needed = {o.name for o in graph.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    kept = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
