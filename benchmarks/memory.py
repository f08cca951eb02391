"""Issue 13's memory targets: the budget holds whatever callers ask.

    python -m benchmarks.memory [--models DIR] [--zoo DIR] [--budget BYTES] [--skip-zoo]

1. The default model (EfficientNet-Lite0) with default settings: Grad-CAM and LayerCAM at every
   layer, the activations of every layer, then every method once. Prints the peak resident
   memory against the 1.2 GB target and the budget, the cache sizes and evictions.
2. A model's second graph: resident memory added by its Grad-CAM session against its weight
   bytes (target: at most 20%).
3. The first Grad-CAM after the model is ready (its graphs warmed at load) against a warm one
   (target: at most 2x).
4. A repository of exported architectures (tests/zoo/export.py, or `--zoo DIR`) explained one
   after another (Grad-CAM and saliency) under the same budget: peak memory and evictions.
Each part runs in a process of its own, so each peak is its own.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import default_model_folder, median_ms, peak_rss_mib
from engines.graphs.sizes import activation_bytes
from engines.imaging.decode import preprocess
from engines.methods.pipeline import WorkLimits
from engines.methods.registry import EXPLAINERS
from engines.models.repository import ModelRepository
from engines.runtime.memory import MemoryBudget, resident_bytes
from engines.runtime.session import RuntimeOptions

CYCLE_TARGET_MIB = 1200
SECOND_GRAPH_TARGET = 0.20
FIRST_REQUEST_TARGET = 2.0
ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _repository(root: Path, budget: int | None, cache: Path) -> ModelRepository:
    options = RuntimeOptions(providers="cpu", intra_op_threads=1)
    return ModelRepository(root, options, cache_dir=cache, budget=MemoryBudget(budget))


def _image(model_input_height: int, model_input_width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (model_input_height, model_input_width, 3), dtype=np.uint8)


def _params(method: str, layer: str | None) -> object:
    model = EXPLAINERS[method].params_model
    fields = model.model_fields
    values: dict[str, object] = {}
    if layer is not None and "layer" in fields:
        values["layer"] = layer
    if "samples" in fields:
        values["samples"] = 8
    if "steps" in fields:
        values["steps"] = 8
    return model(**values)


def cycle(models: Path, budget: int | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as cache:
        repository = _repository(models, budget, Path(cache))
        repository.load_all()
        model = repository.get("efficientnet-lite0")
        spec = model.config.input
        tensor = preprocess([_image(spec.height, spec.width)], spec)
        limits = WorkLimits()
        started = time.perf_counter()
        for layer in model.layers:
            for method in ("gradcam", "layercam"):
                EXPLAINERS[method].explain(
                    model, tensor, None, 1, _params(method, layer.name), limits
                )
            model.layer_activations(tensor, layer.name)
        for method, explainer in EXPLAINERS.items():
            explainer.explain(model, tensor, None, 1, _params(method, None), limits)
        usage = repository.budget.usage()
        return {
            "layers": len(model.layers),
            "seconds": time.perf_counter() - started,
            "peak_mib": peak_rss_mib(),
            "budget_mib": usage.limit_bytes / MIB,
            "resident_mib": {k: round(v / MIB, 1) for k, v in usage.by_kind.items()},
            "evictions": usage.evictions,
        }


def second_graph(models: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as cache:
        options = RuntimeOptions(providers="cpu", intra_op_threads=1)
        repository = ModelRepository(models, options, cache_dir=Path(cache), warm=False)
        repository.load_all()
        model = repository.get("efficientnet-lite0")
        weight_bytes = model.weights.bytes
        tensor = preprocess(
            [_image(model.config.input.height, model.config.input.width)], model.config.input
        )
        key = model.gradients.warm_keys(model.default_layer)[0]
        # Built once (graph files cached), so the measurement is the session alone.
        model.gradients.session(key)
        model.sessions.clear()
        before = resident_bytes()
        model.gradients.run(key, model.input_name, tensor, top_k=1)
        after = resident_bytes()
        return {
            "weights_mib": weight_bytes / MIB,
            "model_file_mib": model.model_path.stat().st_size / MIB,
            "second_graph_mib": (after - before) / MIB,
            "activations_mib": 2 * activation_bytes(model.graph) / MIB,
        }


def first_request(models: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as cache:
        repository = _repository(models, None, Path(cache))
        repository.load_all()  # ready: the default layer's graphs are warm
        model = repository.get("efficientnet-lite0")
        spec = model.config.input
        tensor = preprocess([_image(spec.height, spec.width)], spec)
        gradcam = EXPLAINERS["gradcam"]
        params = _params("gradcam", None)
        started = time.perf_counter()
        gradcam.explain(model, tensor, None, 1, params, WorkLimits())
        first = (time.perf_counter() - started) * 1000
        warm = median_ms(lambda: gradcam.explain(model, tensor, None, 1, params, WorkLimits()), 20)
        return {"first_ms": first, "warm_ms": warm}


def zoo(folder: Path, budget: int | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as cache:
        repository = _repository(folder, budget, Path(cache))
        repository.warm = False
        repository.load_all()
        explained, failed = 0, []
        for entry in repository.entries():
            try:
                model = repository.get(entry.name)
                spec = model.config.input
                tensor = preprocess([_image(spec.height, spec.width)], spec)
                for method in ("gradcam", "saliency"):
                    EXPLAINERS[method].explain(
                        model, tensor, None, 1, _params(method, None), WorkLimits()
                    )
                explained += 1
            except Exception as exc:  # a model the zoo cannot serve is reported, not fatal
                failed.append(f"{entry.name}: {type(exc).__name__}")
        usage = repository.budget.usage()
        return {
            "models": len(repository.entries()),
            "explained": explained,
            "failed": failed,
            "peak_mib": peak_rss_mib(),
            "budget_mib": usage.limit_bytes / MIB,
            "evictions": usage.evictions,
            "loaded_at_end": sum(e.model is not None for e in repository.entries()),
        }


def _child(part: str, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.memory", "--part", part, *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        sys.exit(f"part {part} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _export_zoo(target: Path) -> Path:
    from benchmarks.zoo import _export_zoo as export

    return export(target, [], 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, help="repository with efficientnet-lite0")
    parser.add_argument("--zoo", type=Path, help="a repository of exports (default: export)")
    parser.add_argument("--budget", type=int, default=0, help="bytes; 0 = the default")
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = args.budget or None
    if args.part is not None:
        folder = args.folder
        parts = {
            "cycle": lambda: cycle(folder, budget),
            "second": lambda: second_graph(folder),
            "first": lambda: first_request(folder),
            "zoo": lambda: zoo(folder, budget),
        }
        print(json.dumps(parts[args.part]()))
        return
    with tempfile.TemporaryDirectory() as scratch:
        models = args.models
        if models is None:
            models = Path(scratch) / "models"
            default_model_folder(models)
        extra = ["--folder", str(models), "--budget", str(args.budget)]
        cycled = _child("cycle", *extra)
        peak = cycled["peak_mib"]
        print(f"default model, {cycled['layers']} layers x (Grad-CAM, LayerCAM, activations)")
        print(
            f"  and every method: peak resident {peak:.0f} MiB (target < {CYCLE_TARGET_MIB}): "
            f"{_verdict(peak < CYCLE_TARGET_MIB)}; budget {cycled['budget_mib']:.0f} MiB"
        )
        print(
            f"  resident by kind (MiB) {cycled['resident_mib']}, evictions "
            f"{cycled['evictions']}, {cycled['seconds']:.1f} s"
        )
        second = _child("second", *extra)
        share = second["second_graph_mib"] / second["weights_mib"]
        print(
            f"second graph: +{second['second_graph_mib']:.1f} MiB resident against "
            f"{second['weights_mib']:.1f} MiB of weights = {share:.0%} "
            f"(target <= {SECOND_GRAPH_TARGET:.0%}): {_verdict(share <= SECOND_GRAPH_TARGET)}"
        )
        first = _child("first", *extra)
        ratio = first["first_ms"] / first["warm_ms"]
        print(
            f"first Grad-CAM after ready {first['first_ms']:.1f} ms, warm "
            f"{first['warm_ms']:.1f} ms = {ratio:.2f}x (target <= {FIRST_REQUEST_TARGET}x): "
            f"{_verdict(ratio <= FIRST_REQUEST_TARGET)}"
        )
        if args.skip_zoo:
            return
        zoo_folder = args.zoo or _export_zoo(Path(scratch) / "zoo")
        explained = _child("zoo", "--folder", str(zoo_folder), "--budget", str(args.budget))
        print(
            f"zoo: {explained['explained']}/{explained['models']} explained, peak "
            f"{explained['peak_mib']:.0f} MiB, budget {explained['budget_mib']:.0f} MiB, "
            f"evictions {explained['evictions']}, loaded at the end "
            f"{explained['loaded_at_end']}; failed {explained['failed']}"
        )


def _verdict(met: bool) -> str:
    return "ok" if met else "MISSED"


if __name__ == "__main__":
    main()
