"""Shape inference runs once per graph: a loaded model's graph carries its shapes."""

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from engines.graphs.shapes import with_shapes
from engines.graphs.sizes import activation_bytes
from engines.models.layers import spatial_layers
from engines.models.loaded import LoadedModel
from tests.conftest import CPU
from tests.tiny_models import write_model_folder


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    infer = onnx.shape_inference.infer_shapes

    def counted(model: onnx.ModelProto, *args: object, **kwargs: object) -> onnx.ModelProto:
        calls.append(1)
        return infer(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", counted)
    return calls


def test_a_marked_graph_is_not_inferred_again_and_a_changed_one_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    calls = _counting(monkeypatch)
    inferred = with_shapes(model)
    assert with_shapes(inferred) is inferred
    assert len(calls) == 1
    inferred.graph.node.append(helper.make_node("Sigmoid", ["y"], ["z"]))
    again = with_shapes(inferred)
    assert len(calls) == 2
    assert "z" in {v.name for v in again.graph.value_info}


def test_the_loaded_graph_serves_layers_and_sizes_without_inferring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LoadedModel("tiny", write_model_folder(tmp_path / "tiny"), CPU)
    calls = _counting(monkeypatch)
    assert [layer.name for layer in spatial_layers(model.graph, model.config.input)] == [
        layer.name for layer in model.layers
    ]
    assert activation_bytes(model.graph) == model.activation_bytes
    assert calls == []
