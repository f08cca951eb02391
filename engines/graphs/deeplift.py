"""DeepLift's rescale rule (Shrikumar et al. 2017, as Captum's DeepLift applies it).

The gradient graph gets a second forward branch, fed the baseline (`reference` input): every
node that depends on the model input is copied onto reference tensors. At each elementwise
nonlinearity the backward multiplier becomes (f(x) - f(x0)) / (x - x0), read off both branches,
with the ordinary derivative f'(x) where |x - x0| is below `EPSILON` (Captum's eps). Linear ops
(Conv, Gemm, Add, pooling, reshapes) keep their ordinary gradients, which DeepLift's linear rule
equals; so do ops Captum has no rule for either.
"""

import onnx

from engines.errors import UnsupportedModel
from engines.graphs.context import NodeGrad, subgraph_reads

REFERENCE = "reference"
EPSILON = 1e-10
# Elementwise ops of one input (besides constant parameters) whose multiplier is rescaled.
RESCALED = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Gelu",
        "Mish",
        "Erf",
        "Exp",
    }
)
PREFIX = "deeplift_ref/"


def add_reference_branch(
    graph: onnx.GraphProto, data_input: str, taken: set[str]
) -> dict[str, str]:
    """Copy every node that depends on `data_input` onto tensors computed from `REFERENCE`;
    return each forward tensor's reference tensor. `taken`: names in use (extended)."""
    reference = {data_input: REFERENCE}
    copies = []
    for node in graph.node:
        if not any(i in reference for i in node.input if i):
            continue
        if subgraph_reads(node) & reference.keys():
            label = node.name or node.output[0]
            raise UnsupportedModel(f"DeepLift cannot copy {node.op_type} node {label!r}'s subgraph")
        for output in node.output:
            if output:
                name, count = PREFIX + output, 0
                while name in taken:
                    count += 1
                    name = f"{PREFIX}{output}_{count}"
                taken.add(name)
                reference[output] = name
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = PREFIX + node.name if node.name else ""
        copy.input[:] = [reference.get(i, i) for i in node.input]
        copy.output[:] = [reference.get(o, o) for o in node.output]
        copies.append(copy)
    graph.node.extend(copies)
    return reference


def reference_input(graph: onnx.GraphProto, data_input: str) -> onnx.ValueInfoProto:
    declared = next(i for i in graph.input if i.name == data_input)
    value = onnx.ValueInfoProto()
    value.CopyFrom(declared)
    value.name = REFERENCE
    return value


def rescaled(ctx: NodeGrad, plain: str, reference: dict[str, str]) -> str:
    """The input gradient of a RESCALED node under the rescale rule; `plain` is its ordinary one."""
    x, y = ctx.node.input[0], ctx.node.output[0]
    if x not in reference or y not in reference:
        return plain
    delta_in = ctx.op("Sub", [x, reference[x]])
    delta_out = ctx.op("Sub", [y, reference[y]])
    small = ctx.op("Less", [ctx.op("Abs", [delta_in]), ctx.emit.scalar(EPSILON)])
    safe = ctx.op("Where", [small, ctx.emit.scalar(1.0), delta_in])
    multiplier = ctx.op("Div", [delta_out, safe])
    return ctx.op("Where", [small, plain, ctx.op("Mul", [ctx.grad, multiplier])])
