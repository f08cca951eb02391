"""Shape inference, run once per graph: a loaded model's graph carries its inferred shapes.

Layers, activation sizes, the CAM head, the model summary and the differentiation all read a
model's tensor shapes. `with_shapes` infers them and marks the result with what it was
inferred for (the opset, the inputs' shapes and every node output), so a graph that still
matches is not inferred again, and a graph changed since (nodes added, an input fixed) is.
"""

import hashlib

import onnx

_MARK = "onnx_explain.shapes_inferred_for"


def _signature(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    for opset in model.opset_import:
        digest.update(f"{opset.domain}:{opset.version};".encode())
    for value in model.graph.input:
        digest.update(value.SerializeToString())
    for node in model.graph.node:
        digest.update(f"{node.op_type}:{','.join(node.output)};".encode())
    return digest.hexdigest()


def with_shapes(model: onnx.ModelProto, *, strict: bool = False) -> onnx.ModelProto:
    """`model` with inferred shapes (onnx's inference with data propagation), from its mark if
    it has them already. Best effort unless `strict`: a model inference fails on comes back
    as it is."""
    signature = _signature(model)
    if any(p.key == _MARK and p.value == signature for p in model.metadata_props):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # onnx raises several types for models it finds inconsistent
        if strict:
            raise
        return model
    for prop in list(inferred.metadata_props):
        if prop.key == _MARK:
            inferred.metadata_props.remove(prop)
    inferred.metadata_props.add(key=_MARK, value=signature)
    return inferred
