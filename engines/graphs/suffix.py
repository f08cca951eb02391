"""The part of a model after one of its tensors: fed that tensor, it computes the output.

Ablation-CAM reruns only this part, once per ablated channel. Whatever else the part reads from
before the layer (a skip connection from an earlier block, the image itself) becomes an extra
input: it does not change when the layer's channels are zeroed, so its clean value is fed.
"""

from dataclasses import dataclass

import onnx
from onnx import helper

from engines.errors import InvalidParameters, UnsupportedModel
from engines.graphs.context import subgraph_reads
from engines.graphs.shapes import with_shapes
from engines.graphs.sizes import activation_bytes

BATCH = "batch"


@dataclass(frozen=True)
class SuffixReads:
    """What a run of the part after a layer needs besides the layer's values."""

    boundary: tuple[str, ...]
    """Tensors from before the layer that the part reads besides it."""
    activation_bytes: int
    """What one row's run computes (estimated)."""


@dataclass(frozen=True)
class Suffix(SuffixReads):
    model: onnx.ModelProto
    """Inputs: the layer, then `boundary`; output: the model's output."""

    @property
    def reads(self) -> SuffixReads:
        return SuffixReads(self.boundary, self.activation_bytes)


def _free_batch(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    dims = copy.type.tensor_type.shape.dim
    if dims:
        dims[0].Clear()
        dims[0].dim_param = BATCH
    return copy


def build_suffix_model(model: onnx.ModelProto, layer: str, output: str) -> Suffix:
    """The nodes `output` needs that come after `layer`, as a model of their own."""
    graph = with_shapes(model).graph
    values = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    initializers = {i.name for i in graph.initializer}
    needed = {output}
    nodes: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if not any(o in needed and o != layer for o in node.output):
            continue
        if layer in node.output:
            raise UnsupportedModel(f"the node making layer {layer!r} has other outputs later on")
        nodes.append(node)
        needed.update(i for i in [*node.input, *subgraph_reads(node)] if i)
    if layer not in needed:
        raise InvalidParameters(f"layer {layer!r} does not lead to output {output!r}")
    nodes.reverse()
    produced = {o for n in nodes for o in n.output}
    read = [i for n in nodes for i in [*n.input, *subgraph_reads(n)] if i]
    # A subgraph's reads include its own inner tensors: only outer ones can be fed.
    outer = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    boundary = tuple(
        dict.fromkeys(
            name
            for name in read
            if name in outer and name not in produced | initializers and name != layer
        )
    )
    missing = [name for name in (layer, *boundary, output) if name not in values]
    if missing:
        raise UnsupportedModel(f"the shape of {missing[0]!r} is unknown")
    inputs = [_free_batch(values[name]) for name in (layer, *boundary)]
    kept = [i for i in graph.initializer if i.name in set(read)]
    suffix_graph = helper.make_graph(
        nodes,
        f"{graph.name}-after-layer",
        inputs,
        [_free_batch(values[output])],
        kept,
    )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.CopyFrom(suffix_graph)
    return Suffix(boundary, activation_bytes(result), result)
