"""Evaluation script: the optional `onnx-ad` package as a gradient-graph builder for Grad-CAM.

This is an evaluation script, not part of the service. It needs the optional package
`onnx-ad` (PyPI), plus onnx, onnxruntime and numpy, none of which the project installs for it:

    python3 -m venv /tmp/onnxad-eval
    /tmp/onnxad-eval/bin/pip install onnx-ad onnxruntime numpy onnx
    /tmp/onnxad-eval/bin/python benchmarks/onnx_ad_eval.py --model PATH/model.onnx

It builds onnx-ad reverse-mode (vector-Jacobian) graphs of a classifier and prints:

* whether the symbolic batch dimension, or a layer tensor, can be differentiated directly;
* build times, and the backward graph's node counts by op type (as emitted, and live);
* CPU latencies (onnxruntime, fixed intra-op threads, median after warm-up) of the plain
  forward, the input gradient, the layer gradient (via a zero "probe" added to the layer
  tensor, since onnx-ad only differentiates graph inputs) and both in one run, as ratios to
  the forward. Three variants of each graph: as emitted; "pruned" (the dead nodes onnx-ad
  leaves behind removed); "fixed" (pruned, and every ConvTranspose given explicit pads and
  output_padding instead of `output_shape`, which makes the runtime ignore asymmetric pads);
* an onnxruntime profile of the gradient graphs summarised by op type;
* correctness: the adjoint identity <u, J v> = <J^T u, v> for every distinct Conv of the
  model on its own; the full input gradient against central finite differences and against
  onnx-ad's own forward mode (a JVP) along random directions; the layer gradient against
  central finite differences;
* several seeds (classes) in one run, and a fixed batch of more than one image.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ad
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

PROBE = "onnx_ad_eval/probe"
ADJ = "adj_"
FWD = "fwd_"
VARIANTS = ("emitted", "pruned", "fixed")


# --- graph preparation -----------------------------------------------------------------------


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    return result


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy with the leading dimension of every graph input and output fixed to `batch`.

    Intermediate value_info is dropped so that shape inference re-derives it from the inputs
    (the stored value_info still carries the symbolic batch name).
    """
    fixed = copy(model)
    del fixed.graph.value_info[:]
    for value in [*fixed.graph.input, *fixed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_value = batch
    return fixed


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every value's shape according to onnx shape inference, -1 for an unknown dimension."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shapes


def static_shape(model: onnx.ModelProto, name: str) -> list[int]:
    shape = inferred_shapes(model).get(name)
    if shape is None or -1 in shape:
        raise ValueError(f"'{name}' has no static shape: {shape}")
    return shape


def with_probe(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """A copy where every consumer of `layer` reads `layer + probe` instead.

    `probe` is a new graph input of the layer's shape, fed with zeros: the gradient with
    respect to it is the gradient with respect to the layer tensor, and onnx-ad can take it
    because it is a graph input. The layer tensor (the Grad-CAM activation) becomes a graph
    output too.
    """
    shape = static_shape(model, layer)
    probed = copy(model)
    graph = probed.graph
    added = layer + "/probed"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == layer:
                node.input[i] = added
    producer = next(i for i, node in enumerate(graph.node) if layer in node.output)
    graph.node.insert(producer + 1, helper.make_node("Add", [layer, PROBE], [added]))
    graph.input.append(helper.make_tensor_value_info(PROBE, TensorProto.FLOAT, shape))
    graph.output.append(helper.make_tensor_value_info(layer, TensorProto.FLOAT, shape))
    return probed


def prune_dead(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy without the nodes whose outputs reach no graph output, and how many went."""
    pruned = copy(model)
    graph = pruned.graph
    nodes = list(graph.node)
    wanted = {value.name for value in graph.output}
    while True:
        used = set(wanted)
        for node in nodes:
            used.update(node.input)
        live = [node for node in nodes if any(name in used for name in node.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    removed = len(graph.node) - len(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return pruned, removed


def fix_conv_transpose(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where each ConvTranspose with `output_shape` gets explicit pads instead.

    onnx-ad's Conv adjoint is a ConvTranspose carrying the Conv's `pads` *and* an
    `output_shape`. The ONNX spec (and onnxruntime) then derive the pads from `output_shape`
    and ignore the given ones, which is only right when the Conv's padding happens to be the
    split the spec picks; TF-style "SAME" pads (more at the end) come out shifted by a pixel.
    Keeping the pads and setting `output_padding` to reach the wanted size is exact.
    """
    fixed = copy(model)
    shapes = inferred_shapes(fixed)
    changed = 0
    for node in fixed.graph.node:
        if node.op_type != "ConvTranspose":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if "output_shape" not in attrs:
            continue
        wanted = list(attrs["output_shape"])
        spatial = len(wanted)
        size = shapes.get(node.input[0], [-1])[2:]
        kernel = shapes.get(node.input[1], [-1])[2:]
        if -1 in size or -1 in kernel or len(size) != spatial:
            continue
        strides = list(attrs.get("strides", [1] * spatial))
        dilations = list(attrs.get("dilations", [1] * spatial))
        pads = list(attrs.get("pads", [0] * 2 * spatial))
        natural = [
            strides[i] * (size[i] - 1)
            + (kernel[i] - 1) * dilations[i]
            + 1
            - pads[i]
            - pads[i + spatial]
            for i in range(spatial)
        ]
        extra = [w - n for w, n in zip(wanted, natural, strict=True)]
        if any(e < 0 or e >= max(s, d) for e, s, d in zip(extra, strides, dilations, strict=True)):
            continue
        kept = [a for a in node.attribute if a.name not in ("output_shape", "output_padding")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if any(extra):
            node.attribute.append(helper.make_attribute("output_padding", extra))
        changed += 1
    return fixed, changed


def label_conv_transpose(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name ConvTranspose nodes by kind, so the profile can tell depthwise from dense ones."""
    labelled = copy(model)
    for i, node in enumerate(labelled.graph.node):
        if node.op_type == "ConvTranspose":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            node.name = f"ConvTranspose[{'depthwise' if group > 1 else 'dense'}]#{i}"
    return labelled


def op_counts(nodes: list[onnx.NodeProto]) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in nodes)


def timed_build(
    build: Callable[[], onnx.ModelProto], repeats: int = 3
) -> tuple[onnx.ModelProto, float]:
    """The built model and the median build time in ms."""
    times, model = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        model = build()
        times.append(time.perf_counter() - start)
    assert model is not None
    return model, statistics.median(times) * 1e3


# --- running --------------------------------------------------------------------------------


def make_session(
    model: onnx.ModelProto, threads: int, profile_prefix: str | None = None
) -> tuple[ort.InferenceSession, float]:
    """A CPU session (default graph optimizations) and its creation time in ms."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    start = time.perf_counter()
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, (time.perf_counter() - start) * 1e3


def latency_ms(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int, warmup: int
) -> tuple[float, float, float]:
    """(median, min, max) latency of `session.run` in ms."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def latencies_ms(
    cases: dict[str, tuple[ort.InferenceSession, dict[str, np.ndarray]]], runs: int, warmup: int
) -> dict[str, tuple[float, float, float]]:
    """(median, min, max) latency in ms per case, each case warmed up and timed in one block.

    Not round-robin: with 2 cores, the intra-op pool of the session that ran last keeps
    spinning for a while and slows whichever session runs next (a 3.6 ms forward reads 8 ms
    when interleaved with a gradient graph), which is not what a served graph sees.
    """
    return {
        name: latency_ms(session, feeds, runs, warmup) for name, (session, feeds) in cases.items()
    }


def run_named(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    return dict(zip(names, session.run(names, feeds), strict=True))


def profile_by_op(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, runs: int
) -> tuple[list[tuple[str, float, float, int]], float]:
    """Per op type: (op, ms per run, share of kernel time, kernel calls per run), and the
    total kernel time per run in ms. ConvTranspose is split into depthwise and dense."""
    with tempfile.TemporaryDirectory() as folder:
        session, _ = make_session(label_conv_transpose(model), threads, f"{folder}/profile")
        session.run(None, feeds)  # warm-up: profiled too, dropped below
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first_timed = starts[1] if len(starts) > 1 else 0
    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if event["ts"] < first_timed:
            continue
        op = event["args"]["op_name"]
        if op == "ConvTranspose" and "[" in name:
            op = name.split("#")[0]
        total[op] += event["dur"]
        calls[op] += 1
    grand = sum(total.values()) or 1.0
    rows = [
        (op, us / runs / 1e3, us / grand, calls[op] // runs)
        for op, us in sorted(total.items(), key=lambda item: -item[1])
    ]
    return rows, grand / runs / 1e3


# --- checks ---------------------------------------------------------------------------------


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def conv_adjoint_check(
    model: onnx.ModelProto, threads: int, rng: np.random.Generator
) -> list[tuple[str, dict[str, list[int]], float]]:
    """<u, J v> vs <J^T u, v> for each distinct Conv of `model` (batch 1) differentiated alone:
    (node name, attributes, relative error) per distinct shape/attribute combination."""
    shapes = inferred_shapes(model)
    weights = {t.name: t for t in model.graph.initializer}
    results, seen = [], set()
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        in_shape, out_shape = shapes[node.input[0]], shapes[node.output[0]]
        key = (tuple(in_shape), tuple(weights[node.input[1]].dims), repr(sorted(attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", node.input[1]], ["y"], **attrs)],
            "conv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
            [weights[node.input[1]]],
        )
        single = helper.make_model(graph, opset_imports=list(model.opset_import))
        single.ir_version = model.ir_version
        vjp = make_session(onnx_ad.reverse(single, layout="onnx"), threads)[0]
        plain = make_session(single, threads)[0]
        x = rng.standard_normal(in_shape).astype(np.float32)
        u = rng.standard_normal(out_shape).astype(np.float32)
        v = rng.standard_normal(in_shape).astype(np.float32)
        adjoint = vjp.run(["adj_x"], {"x": x, "adj_y": u[..., None]})[0][..., 0]
        lhs = float(np.sum(u.astype(np.float64) * plain.run(["y"], {"x": v})[0]))
        rhs = float(np.sum(adjoint.astype(np.float64) * v))
        shown = {k: list(attrs[k]) for k in ("kernel_shape", "strides", "pads") if k in attrs}
        shown["group"] = [int(attrs.get("group", 1))]
        results.append((node.name or node.output[0], shown, relative_error(lhs, rhs)))
    return results


LINEAR_OPS = {
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Identity",
    "Transpose",
    "Clip",
}


def clip_inputs(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int
) -> list[tuple[onnx.NodeProto, np.ndarray, float, float]]:
    """Each Clip node with its input value for `feeds` and its (min, max) bounds."""
    constants = {
        t.name: float(numpy_helper.to_array(t).reshape(-1)[0])
        for t in model.graph.initializer
        if list(t.dims) in ([], [1])
    }
    clips = [node for node in model.graph.node if node.op_type == "Clip"]
    traced = copy(model)
    for node in clips:
        traced.graph.output.append(helper.make_empty_tensor_value_info(node.input[0]))
    names = [node.input[0] for node in clips]
    values = make_session(traced, threads)[0].run(names, feeds)
    result = []
    for node, value in zip(clips, values, strict=True):
        bounds = [
            constants.get(node.input[i], bound) if len(node.input) > i and node.input[i] else bound
            for i, bound in ((1, -np.inf), (2, np.inf))
        ]
        result.append((node, value, bounds[0], bounds[1]))
    return result


def linearised(
    model: onnx.ModelProto, clips: list[tuple[onnx.NodeProto, np.ndarray, float, float]]
) -> onnx.ModelProto | None:
    """The model's exact linearisation at a point, for a piecewise-linear network only.

    Every Clip becomes a multiplication by its frozen 0/1 mask at that point, every bias
    (Conv B, Gemm C, a constant Add operand) is dropped, so running it on a direction `v`
    gives J v with no step size and no onnx-ad involved. None when the model has an op
    outside LINEAR_OPS.
    """
    if any(node.op_type not in LINEAR_OPS for node in model.graph.node):
        return None
    masks = {node.output[0]: (value, lo, hi) for node, value, lo, hi in clips}
    lin = copy(model)
    constant = {t.name for t in lin.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Clip":
            value, lo, hi = masks[node.output[0]]
            mask = ((value >= lo) & (value <= hi)).astype(np.float32)
            name = node.output[0] + "/frozen_mask"
            lin.graph.initializer.append(numpy_helper.from_array(mask, name))
            nodes.append(helper.make_node("Mul", [node.input[0], name], [node.output[0]]))
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            del new.input[2:]
        if node.op_type == "Add" and any(name in constant for name in node.input):
            kept = [name for name in node.input if name not in constant]
            new = helper.make_node("Identity", kept[:1], [node.output[0]])
        nodes.append(new)
    del lin.graph.node[:]
    lin.graph.node.extend(nodes)
    return lin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--input", default="input", help="image input name")
    parser.add_argument("--output", default="logits", help="class-score output name")
    parser.add_argument("--layer", default="head/relu6", help="Grad-CAM layer tensor")
    parser.add_argument("--target", type=int, default=281, help="class to seed")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, every session")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-runs", type=int, default=5)
    parser.add_argument("--directions", type=int, default=2, help="finite-difference directions")
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=5, help="classes seeded in one run")
    parser.add_argument("--batch", type=int, default=2, help="fixed batch for the batch check")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(
        f"onnx-ad {onnx_ad.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}"
        f", numpy {np.__version__}; intra-op threads {args.threads}, median of {args.runs} runs"
        f" after {args.warmup} warm-up"
    )
    original = onnx.load(str(args.model))
    opsets = {o.domain or "ai.onnx": o.version for o in original.opset_import}
    print(
        f"model {args.model}: opset {opsets}, {len(original.graph.node)} nodes: "
        f"{dict(op_counts(list(original.graph.node)))}"
    )

    # 1. what reverse() accepts -------------------------------------------------------------
    print("\n[limits]")
    attempts: dict[str, Callable[[], object]] = {
        "symbolic batch, as stored": lambda: onnx_ad.reverse(
            original, inputs=[args.input], outputs=[args.output], layout="onnx"
        ),
        "layer tensor in inputs=": lambda: onnx_ad.reverse(
            with_batch(original, 1), inputs=[args.layer], outputs=[args.output], layout="onnx"
        ),
    }
    for title, attempt in attempts.items():
        try:
            attempt()
            print(f"  {title}: built")
        except Exception as error:
            print(f"  {title}: refused: {type(error).__name__}: {error}")

    # 2. builds (batch fixed to 1) ------------------------------------------------------------
    primal = with_batch(original, 1)
    probed = with_probe(primal, args.layer)
    adj_in, adj_probe, seed_name = ADJ + args.input, ADJ + PROBE, ADJ + args.output
    builds: dict[str, tuple[onnx.ModelProto, list[str]]] = {
        "input": (primal, [args.input]),
        "layer": (probed, [PROBE]),
        "input+layer": (probed, [args.input, PROBE]),
    }
    print("\n[build] onnx_ad.reverse(model, inputs, outputs=[output], layout='onnx'), batch 1:")
    graphs: dict[tuple[str, str], onnx.ModelProto] = {}
    for key, (source, wrt) in builds.items():

        def build(source: onnx.ModelProto = source, wrt: list[str] = wrt) -> onnx.ModelProto:
            built: onnx.ModelProto = onnx_ad.reverse(
                source, inputs=wrt, outputs=[args.output], layout="onnx"
            )
            return built

        emitted, build_ms = timed_build(build)
        onnx.checker.check_model(emitted)
        new = [*emitted.graph.input[len(source.graph.input) :]]
        new += [*emitted.graph.output[len(source.graph.output) :]]
        signature = ", ".join(
            f"{v.name}{[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}"
            for v in new
        )
        pruned, removed = prune_dead(emitted)
        fixed, changed = fix_conv_transpose(pruned)
        graphs[key, "emitted"], graphs[key, "pruned"], graphs[key, "fixed"] = (
            emitted,
            pruned,
            fixed,
        )
        print(
            f"  {key:11s} {build_ms:6.0f} ms (median of 3), {len(emitted.graph.node)} nodes "
            f"({removed} dead), {changed} ConvTranspose re-padded; new I/O: {signature}"
        )

    print("\n[backward graph] nodes onnx-ad adds to the primal, by op type:")
    for key in ("input", "layer"):
        source = builds[key][0]
        added = list(graphs[key, "emitted"].graph.node)[len(source.graph.node) :]
        live = {tuple(node.output) for node in graphs[key, "pruned"].graph.node}
        for title, nodes in (
            ("as emitted", added),
            ("live", [n for n in added if tuple(n.output) in live]),
        ):
            counts = op_counts(nodes)
            listed = ", ".join(f"{op} {n}" for op, n in counts.most_common())
            print(f"  {key} {title}: {sum(counts.values())}: {listed}")

    # 3. latency ------------------------------------------------------------------------------
    image = rng.uniform(-1.0, 1.0, static_shape(primal, args.input)).astype(np.float32)
    layer_shape = static_shape(primal, args.layer)
    zeros = np.zeros(layer_shape, np.float32)
    num_classes = static_shape(primal, args.output)[-1]
    seed = np.zeros((1, num_classes, 1), np.float32)
    seed[0, args.target, 0] = 1.0
    feeds = {
        "forward": {args.input: image},
        "input": {args.input: image, seed_name: seed},
        "layer": {args.input: image, PROBE: zeros, seed_name: seed},
        "input+layer": {args.input: image, PROBE: zeros, seed_name: seed},
    }
    print(f"\n[latency] CPU, batch 1, seed = one-hot class {args.target}; ms:")
    forward_session, forward_init = make_session(original, args.threads)
    sessions: dict[tuple[str, str], ort.InferenceSession] = {}
    cases = {"forward": (forward_session, feeds["forward"])}
    init_ms = {"forward": forward_init}
    for key in builds:
        for variant in VARIANTS:
            session, init_ms[f"{key} {variant}"] = make_session(graphs[key, variant], args.threads)
            sessions[key, variant] = session
            cases[f"{key} {variant}"] = (session, feeds[key])
    timings = latencies_ms(cases, args.runs, args.warmup)
    forward_ms = timings["forward"][0]
    for name, (median, lo, hi) in timings.items():
        print(
            f"  {name:20s} {median:8.2f} (min {lo:6.2f}, max {hi:6.2f}) "
            f"x{median / forward_ms:5.1f}  session {init_ms[name]:4.0f} ms"
        )

    # 4. profile ----------------------------------------------------------------------------
    profiled = [("forward", original, feeds["forward"])]
    profiled += [
        (f"{key} {v}", graphs[key, v], feeds[key])
        for key in ("input", "layer")
        for v in ("emitted", "fixed")
    ]
    for title, model, feed in profiled:
        rows, kernel_ms = profile_by_op(model, feed, args.threads, args.profile_runs)
        print(f"\n[profile] {title}: {kernel_ms:.1f} ms kernel time per run (with profiling)")
        for op, ms, share, calls in rows[:8]:
            print(f"  {op:26s} {ms:7.2f} ms {100 * share:5.1f}%  {calls:3d} calls")

    # 5. correctness --------------------------------------------------------------------------
    print("\n[correctness] adjoint identity <u, conv(v)> = <adj_x(u), v>, each distinct Conv:")
    checks = conv_adjoint_check(primal, args.threads, rng)
    bad = [check for check in checks if check[2] > 1e-4]
    print(f"  {len(checks)} distinct Convs, {len(bad)} wrong (rel err > 1e-4):")
    for name, shown, relative in bad:
        print(f"    {name}: {shown}: rel err {relative:.2e}")
    if not bad:
        print("    none")

    print(
        f"\n[correctness] f = {args.output}[0, {args.target}]; central differences eps {args.eps}"
    )
    probe_session = make_session(probed, args.threads)[0]

    def score(x: np.ndarray, probe: np.ndarray) -> float:
        out = probe_session.run([args.output], {args.input: x, PROBE: probe})[0]
        return float(out[0, args.target])

    jvp_model = onnx_ad.forward(primal, inputs=[args.input], outputs=[args.output], layout="onnx")
    jvp_session = make_session(jvp_model, args.threads)[0]
    results: dict[str, dict[str, np.ndarray]] = {
        variant: run_named(
            sessions["input+layer", variant], feeds["input+layer"], [adj_in, adj_probe]
        )
        for variant in ("emitted", "fixed")
    }
    only_input = run_named(sessions["input", "fixed"], feeds["input"], [adj_in])[adj_in]
    print(
        "  input gradient, input-only vs input+layer graph (fixed): max |diff| "
        f"{float(np.abs(only_input - results['fixed'][adj_in]).max()):.2e}"
    )
    clips = clip_inputs(primal, feeds["forward"], args.threads)
    lin_model = linearised(primal, clips)
    lin_session = None if lin_model is None else make_session(lin_model, args.threads)[0]
    traced = copy(probed)
    for node, *_ in clips:
        traced.graph.output.append(helper.make_empty_tensor_value_info(node.input[0]))
    traced_session = make_session(traced, args.threads)[0]
    clip_names = [node.input[0] for node, *_ in clips]

    def flips(a: np.ndarray, b: np.ndarray) -> int:
        """Clip units whose pass/clip state differs between the two inputs."""
        states = []
        for x in (a, b):
            values = traced_session.run(clip_names, {args.input: x, PROBE: zeros})
            states.append(
                [(v >= lo) & (v <= hi) for v, (_, _, lo, hi) in zip(values, clips, strict=True)]
            )
        return sum(int((p != q).sum()) for p, q in zip(*states, strict=True))

    units = sum(value.size for _, value, _, _ in clips)
    print(
        f"  reference: the exact linearisation (Clip masks frozen at x, {units} units)"
        if lin_session is not None
        else "  reference: onnx-ad's forward mode (the model is not piecewise-linear here)"
    )
    for k in range(args.directions):
        direction = rng.standard_normal(image.shape).astype(np.float32)
        tangent = jvp_session.run(
            [FWD + args.output], {args.input: image, FWD + args.input: direction[..., None]}
        )[0]
        jvp = float(tangent[0, args.target, 0])
        exact = (
            jvp
            if lin_session is None
            else float(lin_session.run([args.output], {args.input: direction})[0][0, args.target])
        )
        print(
            f"  input dir {k}: exact J.v {exact:+.6e}; forward-mode JVP {jvp:+.6e} "
            f"(rel err {relative_error(jvp, exact):.1e})"
        )
        for variant in ("emitted", "fixed"):
            grad = results[variant][adj_in][..., 0].astype(np.float64)
            ad = float(np.sum(grad * direction))
            print(f"    reverse {variant:7s} {ad:+.6e}  rel err {relative_error(ad, exact):.1e}")
        for eps in (args.eps, args.eps / 10, args.eps / 100):
            plus, minus = image + eps * direction, image - eps * direction
            fd = (score(plus, zeros) - score(minus, zeros)) / (2 * eps)
            changed = flips(plus, minus)
            print(
                f"    central diff eps {eps:.0e} {fd:+.6e}  rel err "
                f"{relative_error(fd, exact):.1e}  ({changed} Clip units change state)"
            )
    for k in range(args.directions):
        direction = rng.standard_normal(layer_shape).astype(np.float32)
        fd = (score(image, args.eps * direction) - score(image, -args.eps * direction)) / (
            2 * args.eps
        )
        ad = float(np.sum(results["fixed"][adj_probe][..., 0].astype(np.float64) * direction))
        print(
            f"  layer dir {k}: central diff {fd:+.5e}, reverse {ad:+.5e}, rel err "
            f"{relative_error(ad, fd):.1e}"
        )

    # 6. several seeds in one run ---------------------------------------------------------------
    count = args.seeds
    classes = rng.choice(num_classes, size=count, replace=False)
    batched = np.zeros((1, num_classes, count), np.float32)
    batched[0, classes, np.arange(count)] = 1.0
    print(f"\n[{count} seeds in one run] {seed_name} [1, {num_classes}, {count}] (fixed graphs):")
    session = sessions["input+layer", "fixed"]
    many = run_named(session, {**feeds["input+layer"], seed_name: batched}, [adj_in, adj_probe])
    worst = dict.fromkeys((adj_in, adj_probe), 0.0)
    for column, cls in enumerate(classes):
        one = np.zeros_like(seed)
        one[0, cls, 0] = 1.0
        single = run_named(session, {**feeds["input+layer"], seed_name: one}, [adj_in, adj_probe])
        for name in worst:
            diff = np.abs(many[name][..., column] - single[name][..., 0]).max()
            worst[name] = max(worst[name], float(diff))
    print(
        f"  {adj_in} {list(many[adj_in].shape)}, {adj_probe} {list(many[adj_probe].shape)}; "
        f"max |diff| vs one seed per run: {worst[adj_in]:.1e}, {worst[adj_probe]:.1e}"
    )
    cases = {"forward": (forward_session, feeds["forward"])}
    for key in builds:
        cases[f"{key} 1"] = (sessions[key, "fixed"], feeds[key])
        cases[f"{key} {count}"] = (sessions[key, "fixed"], {**feeds[key], seed_name: batched})
    timings = latencies_ms(cases, args.runs, args.warmup)
    forward_ms = timings["forward"][0]
    print(f"  forward {forward_ms:.2f} ms")
    for key in builds:
        one_ms, many_ms = timings[f"{key} 1"][0], timings[f"{key} {count}"][0]
        print(
            f"  {key:11s} 1 seed {one_ms:7.2f} ms, {count} seeds {many_ms:7.2f} ms "
            f"(x{many_ms / one_ms:.2f} the 1-seed run, x{many_ms / forward_ms:.1f} forward)"
        )

    # 7. a fixed batch of several images --------------------------------------------------------
    batch = args.batch
    print(f"\n[batch {batch}] input-gradient graph rebuilt with the batch fixed to {batch}:")
    try:
        emitted = onnx_ad.reverse(
            with_batch(original, batch), inputs=[args.input], outputs=[args.output], layout="onnx"
        )
        session = make_session(fix_conv_transpose(prune_dead(emitted)[0])[0], args.threads)[0]
        images = rng.uniform(-1.0, 1.0, (batch, *image.shape[1:])).astype(np.float32)
        images[0] = image[0]
        seeds = np.zeros((batch, num_classes, 1), np.float32)
        seeds[:, args.target, 0] = 1.0
        batch_feeds = {args.input: images, seed_name: seeds}
        result = session.run([adj_in], batch_feeds)[0]
        diff = float(np.abs(result[:1] - results["fixed"][adj_in]).max())
        timings = latencies_ms(
            {
                "forward": (forward_session, {args.input: images}),
                "gradient": (session, batch_feeds),
            },
            args.runs,
            args.warmup,
        )
        batch_ms, forward_batch_ms = timings["gradient"][0], timings["forward"][0]
        print(
            f"  {adj_in} {list(result.shape)}; image 0 vs the batch-1 graph: max |diff| "
            f"{diff:.1e}; {batch_ms:.2f} ms, x{batch_ms / forward_batch_ms:.1f} the batch-{batch}"
            f" forward ({forward_batch_ms:.2f} ms)"
        )
        try:
            session.run([adj_in], feeds["input"])
            print("  the same graph also ran a batch of 1")
        except Exception as error:
            print(f"  the same graph, batch 1: {str(error).splitlines()[0][:120]}")
    except Exception as error:
        print(f"  failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
