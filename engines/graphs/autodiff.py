"""Reverse-mode differentiation of an ONNX classifier: the forward graph plus a backward part.

Only nodes on a path from the differentiated tensor (the layer, or the model input) to the
class-score output are differentiated. The backward part starts from a `seed` input [M, classes]
and computes vector-Jacobian products: row m of every gradient is d(sum_j seed[m, j] *
output[n, j]) / d tensor, with n = m when the batch N equals M, or n = 0 when N == 1 (the rules
broadcast forward tensors [1, ...] against gradients [M, ...], so M seeds cost one forward).
"""

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.errors import EngineError, InvalidParameters, NoReluLikeOp, UnsupportedModel
from engines.graphs.centring import centre_clips
from engines.graphs.context import (
    DEFAULT_DOMAINS,
    RELU_LIKE,
    Dims,
    Emitter,
    GraphInfo,
    NodeGrad,
    relu_like,
    subgraph_reads,
    walk,
)
from engines.graphs.deeplift import RESCALED, add_reference_branch, reference_input, rescaled
from engines.graphs.derivatives import RULES
from engines.graphs.normalize import at_gradient_opset, opset_of
from engines.graphs.pointwise import swish, swish_muls
from engines.graphs.shapes import with_shapes

log = logging.getLogger(__name__)

SEED = "seed"
ACTIVATION = "activation"
GRAD_LAYER = "grad_layer"
GRAD_INPUT = "grad_input"
RESERVED = (SEED, ACTIVATION, GRAD_LAYER, GRAD_INPUT)


@dataclass(frozen=True)
class GradientSpec:
    output: str  # name of the class-score output (e.g. "logits")
    layer: str | None = None  # an intermediate tensor: return its value and its gradient
    wrt_input: bool = False  # also return the gradient w.r.t. the model input
    guided: bool = False  # guided-backprop rule at ReLU-like ops
    # One seed row per image (M == N), declared by giving `seed` the input's batch dimension.
    # The backward multiplies gradients by forward tensors at every activation; onnxruntime
    # keeps those products in its blocked NCHWc layout only when it can prove both shapes
    # equal, which saves two reorders per activation (saliency on EfficientNet-Lite0: ~12%).
    # Such a graph must not be fed N == 1 with M > 1.
    paired: bool = False
    # DeepLift's rescale rule at nonlinearities, with the baseline fed as input `reference`
    # (engines.graphs.deeplift); the input gradient then is DeepLift's multiplier.
    deeplift: bool = False


def supported_ops() -> list[str]:
    """The op types the backward pass can go through."""
    return sorted(RULES)


def build_gradient_model(model: onnx.ModelProto, spec: GradientSpec) -> onnx.ModelProto:
    """The forward graph of `model` plus the backward part that `spec` asks for.

    Inputs: the model's input [N, ...] and `seed` [M, classes], with M == N or N == 1
    (M == N only when `spec.paired`).
    Outputs, in order: `spec.output` [N, classes]; with a layer, `activation` [N, ...] and
    `grad_layer` [M, ...]; with `wrt_input`, `grad_input` [M, ...]. Row m of a gradient is
    d(sum_j seed[m, j] * output[n, j]) / d tensor[n], n = m (M == N) or 0 (N == 1).
    """
    if spec.layer is None and not spec.wrt_input:
        raise InvalidParameters("nothing to differentiate: ask for a layer, the input or both")
    model = _prepared(model)
    graph = model.graph
    data_input = _data_input(graph)
    layer = _rename_reserved(graph, spec, data_input)
    info = _graph_info(model)
    _check_targets(graph, info, spec, layer, data_input)
    emit = Emitter(_all_names(graph))
    batch = _input_batch_dim(graph, info, data_input) if spec.paired else _fresh_dim(graph)
    sources = {name for name in (layer, data_input if spec.wrt_input else None) if name}
    active = _active_tensors(graph.node, sources, spec.output, info)
    if spec.wrt_input and data_input not in active:
        raise _unreachable(graph.node, data_input, spec.output, info)
    _check_float32(active, info)
    _check_subgraphs(graph, active)
    if spec.guided:
        _check_guided(graph, active, info)
    centre_clips(graph, info, emit, active, {spec.output, data_input, *sources})
    reference: dict[str, str] | None = None
    extra_inputs = []
    if spec.deeplift:
        if spec.layer is not None or spec.guided:
            raise InvalidParameters("DeepLift's graph has the input gradient only")
        reference = add_reference_branch(graph, data_input, emit.taken)
        extra_inputs.append(reference_input(graph, data_input))
    totals, gradients = _backward(
        graph, spec.output, spec.guided, active, info, emit, sorted(sources), reference
    )

    outputs = [_value_info(spec.output, info.shapes[spec.output])]
    if layer is not None:
        emit.nodes.append(_identity(emit, layer, ACTIVATION))
        emit.nodes.append(_identity(emit, totals[layer], GRAD_LAYER))
        outputs.append(_value_info(ACTIVATION, info.shapes[layer]))
        outputs.append(_batched(GRAD_LAYER, info, layer, batch))
    if spec.wrt_input:
        emit.nodes.append(_identity(emit, totals[data_input], GRAD_INPUT))
        outputs.append(_batched(GRAD_INPUT, info, data_input, batch))
    declared = _gradient_shapes(gradients, info, batch)
    seed = _seed_info(info, spec.output, batch)
    return _assemble(model, data_input, emit, outputs, [*extra_inputs, seed], declared)


def _gradient_shapes(
    gradients: dict[str, set[str]], info: GraphInfo, batch: int | str
) -> list[onnx.ValueInfoProto]:
    """`gradients`: gradient tensor -> the forward tensors it is (a part of) the gradient of."""
    """Each gradient's shape: its tensor's, on the gradient batch.

    Shape inference loses the batch's symbol at some ops (Col2Im, Expand of a broadcast,
    Reshape to -1), and from there on onnxruntime cannot prove a gradient and its forward
    tensor the same shape, which costs two layout reorders at every activation.
    """
    declared = []
    for gradient, tensors in gradients.items():
        shapes = {info.shapes.get(t, ())[1:] for t in tensors}
        if gradient == SEED or len(shapes) != 1:
            continue
        (shape,) = shapes
        if shape and all(isinstance(d, int) for d in shape):
            declared.append(_value_info(gradient, [batch, *shape]))
    return declared


def _input_batch_dim(graph: onnx.GraphProto, info: GraphInfo, data_input: str) -> int | str:
    """The input's batch dimension, named first if the model left it blank."""
    dims = info.shapes[data_input]
    declared = next(i for i in graph.input if i.name == data_input).type.tensor_type.shape
    if dims and dims[0] is not None:
        return dims[0]
    if not declared.dim:
        raise UnsupportedModel("the model input has no declared rank")
    name = _fresh_dim(graph, "batch")
    declared.dim[0].dim_param = name
    return name


# --- preparation -----------------------------------------------------------------------------


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy at an opset the backward ops exist in (see `normalize.at_gradient_opset`)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return at_gradient_opset(copy)


def _data_input(graph: onnx.GraphProto) -> str:
    initializers = {i.name for i in graph.initializer}
    inputs = [str(i.name) for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UnsupportedModel(f"the model must have exactly one input, it has {len(inputs)}")
    return inputs[0]


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in walk(graph):
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        names.update(v.name for v in values)
    names.discard("")
    return names


def _rename_reserved(graph: onnx.GraphProto, spec: GradientSpec, data_input: str) -> str | None:
    """Rename internal tensors that use the gradient model's new names; return the layer's name."""
    layer = spec.layer
    names = _all_names(graph)
    for reserved in RESERVED:
        if reserved not in names:
            continue
        if reserved in (data_input, spec.output):
            raise UnsupportedModel(f"the model's {reserved!r} clashes with a gradient output name")
        new = _unique(f"fwd/{reserved}", names)
        names.add(new)
        _rename(graph, reserved, new)
        layer = new if layer == reserved else layer
    return layer


def _unique(base: str, taken: set[str]) -> str:
    name, count = base, 0
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    return name


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for value in values:
            if value.name == old:
                value.name = new


def _dims(value: onnx.ValueInfoProto) -> Dims | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    )


def _graph_info(model: onnx.ModelProto) -> GraphInfo:
    try:
        inferred = with_shapes(model, strict=True)
    except Exception as exc:  # shape inference raises for models it finds inconsistent
        raise UnsupportedModel(f"shape inference failed on the model: {exc}") from exc
    graph = inferred.graph
    shapes: dict[str, Dims] = {}
    elem_types: dict[str, int] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        elem_types[value.name] = value.type.tensor_type.elem_type
        dims = _dims(value)
        if dims is not None:
            shapes[value.name] = dims
    initializers = {i.name: i for i in model.graph.initializer}
    for init in initializers.values():
        shapes[init.name] = tuple(init.dims)
        elem_types[init.name] = init.data_type
    return GraphInfo(
        shapes, elem_types, initializers, _constant_nodes(model.graph), opset_of(model)
    )


def _constant_nodes(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    constants = {}
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
            continue
        attribute = node.attribute[0]
        value = helper.get_attribute_value(attribute)
        if attribute.name == "value":
            constants[node.output[0]] = value
        elif attribute.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = "float32" if "float" in attribute.name else "int64"
            constants[node.output[0]] = numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return constants


def _check_targets(
    graph: onnx.GraphProto,
    info: GraphInfo,
    spec: GradientSpec,
    layer: str | None,
    data_input: str,
) -> None:
    produced = {o for n in graph.node for o in n.output if o}
    if spec.output not in produced:
        raise InvalidParameters(f"unknown output {spec.output!r}")
    if info.elem_types.get(spec.output) != TensorProto.FLOAT:
        raise UnsupportedModel(f"output {spec.output!r} is not a float32 tensor")
    if len(info.shapes.get(spec.output, ())) != 2:
        raise UnsupportedModel(f"output {spec.output!r} is not a [batch, classes] tensor")
    if spec.wrt_input and not info.is_float(data_input):
        raise UnsupportedModel(f"the model input {data_input!r} is not a float tensor")
    if layer is None:
        return
    if layer not in produced and layer != data_input:
        raise InvalidParameters(f"unknown layer {spec.layer!r}")
    if not info.is_float(layer):
        raise InvalidParameters(f"layer {spec.layer!r} is not a float tensor")
    if layer not in _ancestors(graph.node, spec.output):
        raise InvalidParameters(f"layer {spec.layer!r} does not lead to output {spec.output!r}")


# --- the differentiated path -----------------------------------------------------------------


def _check_float32(active: set[str], info: GraphInfo) -> None:
    """The backward part is float32 throughout; double or half tensors on the path cannot mix."""
    for name in sorted(active):
        if info.elem_types.get(name, 0) not in (TensorProto.FLOAT, TensorProto.UNDEFINED):
            raise UnsupportedModel(f"tensor {name!r} on the differentiated path is not float32")


def _check_subgraphs(graph: onnx.GraphProto, active: set[str]) -> None:
    """If/Loop/Scan bodies that read a differentiated tensor have no rule: refuse, by name."""
    for node in graph.node:
        if subgraph_reads(node) & active and any(o in active for o in node.output):
            label = node.name or node.output[0]
            raise UnsupportedModel(
                f"cannot differentiate {node.op_type} node {label!r}: its subgraph reads a "
                "tensor on the differentiated path"
            )


def _check_guided(graph: onnx.GraphProto, active: set[str], info: GraphInfo) -> None:
    """Guided backprop without a ReLU-like op on the path would be plain saliency: refuse."""
    for node in graph.node:
        if relu_like(node, info) and any(i in active for i in node.input[:1]):
            return
    raise NoReluLikeOp(
        "guided backprop needs a ReLU-like op (" + ", ".join(sorted(RELU_LIKE)) + ") between "
        "the input and the output; this model has none (e.g. a SiLU or GELU network)"
    )


QUANTIZING = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
VALUELESS = frozenset({"Shape", "Size"})  # integer outputs that carry no values of the input


def _unreachable(
    nodes: Sequence[onnx.NodeProto], source: str, output: str, info: GraphInfo
) -> UnsupportedModel:
    """Why no gradient flows from `output` back to `source`: the first node on a path between
    them whose outputs are not float (a quantized model's QuantizeLinear, a Cast to an
    integer), or no path at all."""
    ancestors = _ancestors(nodes, output)
    floats = {source}
    for node in nodes:
        if not any(i in floats for i in [*node.input, *subgraph_reads(node)] if i):
            continue
        kept = [o for o in node.output if o and info.is_float(o)]
        floats.update(kept)
        if kept or node.op_type in VALUELESS or not any(o in ancestors for o in node.output):
            continue
        label = node.name or node.output[0]
        kind = TensorProto.DataType.Name(info.elem_types.get(node.output[0], 0)).lower()
        hint = (
            " (a quantized model: explain its float original)" if node.op_type in QUANTIZING else ""
        )
        return UnsupportedModel(
            f"cannot differentiate {node.op_type} node {label!r}: its output is {kind}, not a "
            f"float, and {output!r} depends on {source!r} only through integer tensors{hint}"
        )
    return UnsupportedModel(f"output {output!r} does not depend on {source!r}")


def _ancestors(nodes: Sequence[onnx.NodeProto], output: str) -> set[str]:
    """Every tensor `output` is computed from (itself included), subgraphs' reads among them."""
    needed = {output}
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))
    return needed


def _active_tensors(
    nodes: Sequence[onnx.NodeProto], sources: set[str], output: str, info: GraphInfo
) -> set[str]:
    """Float tensors that depend on a source and that the output depends on."""
    reached = set(sources)
    for node in nodes:
        if any(i in reached for i in [*node.input, *subgraph_reads(node)] if i):
            reached.update(o for o in node.output if o and info.is_float(o))
    return reached & _ancestors(nodes, output)


def _backward(
    graph: onnx.GraphProto,
    output: str,
    guided: bool,
    active: set[str],
    info: GraphInfo,
    emit: Emitter,
    targets: Sequence[str],
    reference: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Emit the backward nodes; return the total gradient of each target, and the forward
    tensor of every gradient emitted (each part of a sum included). With `reference` (each
    forward tensor's twin on the baseline branch) nonlinearities take DeepLift's rescale rule."""
    contributions: dict[str, list[str]] = {output: [SEED]}
    totals: dict[str, str] = {}
    # DeepLift rescales at the Sigmoid, so its graphs keep the two nodes apart
    swishes = {} if reference is not None else swish_muls(graph, active, targets)

    def total(name: str) -> str | None:
        if name not in totals and contributions.get(name):
            parts = contributions[name]
            totals[name] = parts[0] if len(parts) == 1 else emit.op("Sum", parts, name)
        return totals.get(name)

    for node in reversed(graph.node):
        if not any(i in active for i in node.input) or not any(o in active for o in node.output):
            continue
        grads = [total(o) if o in active else None for o in node.output]
        if all(g is None for g in grads):
            continue
        rule = RULES.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
        if node.output[0] in swishes:
            rule = functools.partial(swish, x_index=swishes[node.output[0]])
        if rule is None:
            label = node.name or node.output[0]
            raise UnsupportedModel(f"cannot differentiate {node.op_type} node {label!r}")
        needs = [i in active for i in node.input]
        ctx = NodeGrad(node, grads, needs, emit, info, guided)
        try:
            input_grads = rule(ctx)
        except EngineError:
            raise
        except Exception as exc:  # a rule meeting a form it was not written for
            log.warning("the %s rule failed on node %r", node.op_type, ctx.label, exc_info=True)
            raise ctx.fail(f"its form is not supported ({type(exc).__name__})") from exc
        if reference is not None and node.op_type in RESCALED and input_grads[0] is not None:
            input_grads = [rescaled(ctx, input_grads[0], reference), *input_grads[1:]]
        for name, grad in zip(node.input, input_grads, strict=True):
            if grad is not None and name in active:
                contributions.setdefault(name, []).append(grad)
    result = {}
    for name in targets:
        grad = total(name)
        if grad is None:
            raise _unreachable(graph.node, name, output, info)
        result[name] = grad
    every: dict[str, set[str]] = {}
    for name, parts in contributions.items():
        for part in parts:
            every.setdefault(part, set()).add(name)
    for name, grad in totals.items():
        every.setdefault(grad, set()).add(name)
    return result, every


# --- assembly --------------------------------------------------------------------------------


def _identity(emit: Emitter, source: str, target: str) -> onnx.NodeProto:
    return helper.make_node("Identity", [source], [target], name=emit.fresh(target))


def _value_info(name: str, dims: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    shape = [d if d is not None else None for d in dims]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _batched(name: str, info: GraphInfo, like: str, batch: int | str) -> onnx.ValueInfoProto:
    dims = info.shapes.get(like)
    return _value_info(name, [batch, *dims[1:]] if dims else [batch])


def _seed_info(info: GraphInfo, output: str, batch: int | str) -> onnx.ValueInfoProto:
    classes = info.shapes[output][1]
    return _value_info(SEED, [batch, classes if classes is not None else "classes"])


def _fresh_dim(graph: onnx.GraphProto, base: str = "seeds") -> str:
    """A dim_param that no forward shape uses (by default for the gradient batch M)."""
    used = {
        d.dim_param
        for v in [*graph.input, *graph.output, *graph.value_info]
        for d in v.type.tensor_type.shape.dim
    }
    return _unique(base, used)


def _assemble(
    model: onnx.ModelProto,
    data_input: str,
    emit: Emitter,
    outputs: list[onnx.ValueInfoProto],
    extra_inputs: Sequence[onnx.ValueInfoProto],
    declared: Sequence[onnx.ValueInfoProto] = (),
) -> onnx.ModelProto:
    graph = model.graph
    nodes = _live_nodes([*graph.node, *emit.nodes], [o.name for o in outputs])
    used = {i for n in nodes for i in n.input}
    initializers = [i for i in [*graph.initializer, *emit.initializers] if i.name in used]
    inputs = [i for i in graph.input if i.name == data_input] + list(extra_inputs)
    produced = {o for n in nodes for o in n.output}
    output_names = {o.name for o in outputs}
    value_info = [
        v
        for v in [*graph.value_info, *declared]
        if v.name in produced and v.name not in output_names
    ]
    new_graph = helper.make_graph(
        nodes, f"{graph.name}-gradients", inputs, outputs, initializers, value_info=value_info
    )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.CopyFrom(new_graph)
    return result


def _live_nodes(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs need, in their original (topological) order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_reads(node))  # subgraphs may read outer-scope tensors
    return list(reversed(live))
