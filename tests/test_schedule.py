"""The order of a gradient graph's nodes: what does not wait for the seed runs early."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from engines.graphs.prepared import GraphKey
from engines.models.loaded import LoadedModel
from engines.runtime.schedule import seed_free_first
from engines.runtime.session import RuntimeOptions
from tests.tiny_models import write_model_folder


def _chain_with_a_seed() -> onnx.ModelProto:
    """x -> Relu a -> Relu b -> Relu c; a late part seed * (a > 0) reads `a` only at the end."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="fa"),
        helper.make_node("Relu", ["a"], ["b"], name="fb"),
        helper.make_node("Relu", ["b"], ["c"], name="fc"),
        helper.make_node("Mul", ["seed", "c"], ["late1"], name="l1"),
        helper.make_node("Sign", ["a"], ["mask"], name="early_mask"),
        helper.make_node("Mul", ["late1", "mask"], ["out"], name="l2"),
    ]
    vector = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "seed")]
    graph = helper.make_graph(
        nodes, "g", vector, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def test_a_mask_of_a_forward_tensor_runs_right_after_it_and_the_seeded_part_last() -> None:
    model = _chain_with_a_seed()
    feeds = {
        "x": np.array([-1, 2, 0, 3], np.float32),
        "seed": np.array([1, 2, 3, 4], np.float32),
    }
    before = _run(model, feeds)
    assert seed_free_first(model.graph, {"seed"})
    order = [n.name for n in model.graph.node]
    assert order == ["fa", "fb", "early_mask", "fc", "l1", "l2"]
    onnx.checker.check_model(model)  # still topologically sorted
    np.testing.assert_array_equal(_run(model, feeds), before)


def test_graphs_without_the_seeds_or_with_subgraphs_are_left_as_they_are() -> None:
    model = _chain_with_a_seed()
    names = [n.name for n in model.graph.node]
    assert not seed_free_first(model.graph, {"no-such-tensor"})
    assert [n.name for n in model.graph.node] == names
    branch = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["branch"])],
        "branch",
        [],
        [helper.make_tensor_value_info("branch", TensorProto.FLOAT, [4])],
    )
    model.graph.node.append(
        helper.make_node(
            "If", ["condition"], ["chosen"], then_branch=branch, else_branch=branch, name="if"
        )
    )
    names.append("if")
    assert not seed_free_first(model.graph, {"seed"})
    assert [n.name for n in model.graph.node] == names


def test_prepared_gradient_sessions_are_scheduled_and_give_the_same_gradients(
    tmp_path: Path,
) -> None:
    """The served saliency graph (optimised, shared weights, reordered) against the graph
    onnxruntime optimises by itself."""
    folder = write_model_folder(tmp_path / "cnn")
    model = LoadedModel("cnn", folder, RuntimeOptions(providers="cpu", intra_op_threads=1))
    key = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=True, paired=True)
    spec = model.config.input
    batch = np.random.default_rng(0).standard_normal((1, 3, spec.height, spec.width))
    batch = batch.astype(np.float32)
    served = model.gradients.session(key).run({model.input_name: batch})
    plain = ort.InferenceSession(
        model.gradients.build(key).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {model.input_name: batch})
    assert len(served) == len(plain)
    for got, expected in zip(served, plain, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
