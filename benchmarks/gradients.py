"""Issue 3's speed targets: gradient methods against a plain forward pass of the same model.

    python -m benchmarks.gradients [--threads N] [--repeats N] [--provider cpu|auto]

Same model (EfficientNet-Lite0, 224x224), same provider and threads for every session; prints
median latencies, the ratios to the forward latency, and peak resident memory per phase.
Targets: Grad-CAM <= 1.2x, saliency <= 2.5x, top-5 Grad-CAM <= 1.3x.
"""

import argparse
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import (
    default_model_folder,
    interleaved_medians_ms,
    peak_rss_mib,
    reset_peak_rss,
)
from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions

TARGETS = {"gradcam": 1.2, "saliency": 2.5, "gradcam top-5": 1.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--provider", choices=["cpu", "auto", "cuda"], default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = default_model_folder(root / "models")
        options = RuntimeOptions(providers=args.provider, intra_op_threads=args.threads)
        model = LoadedModel("efficientnet-lite0", folder, options, cache_dir=root / "cache")
        import skimage.data

        cat: np.ndarray = skimage.data.chelsea()  # type: ignore[no-untyped-call]
        tensor = preprocess([cat], model.config.input)
        print(f"provider: {model.session.provider}, threads: {args.threads or 'all'}")

        layer = model.default_layer
        graphs = model.gradients
        cam_key = GraphKey(layer, wrt_input=False, guided=False, top_k_seeds=True)
        input_key = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=True)
        for key in (cam_key, input_key):
            graphs.session(key)  # build and load outside the timings

        cases: dict[str, Callable[[], object]] = {
            "forward": lambda: model.forward(tensor),
            "gradcam": lambda: graphs.run(cam_key, model.input_name, tensor, top_k=1),
            "gradcam top-5": lambda: graphs.run(cam_key, model.input_name, tensor, top_k=5),
            "saliency": lambda: graphs.run(input_key, model.input_name, tensor, top_k=1),
        }
        explainer_cases: dict[str, Callable[[], object]] = {
            f"{name} (whole method)": functools.partial(
                EXPLAINERS[name].explain,
                model,
                tensor,
                None,
                1,
                EXPLAINERS[name].params_model(),
            )
            for name in ("gradcam", "saliency")
        }
        everything = {**cases, **explainer_cases}
        peaks: dict[str, float] = {}
        for name, run in everything.items():
            reset_peak_rss()
            run()
            peaks[name] = peak_rss_mib()
        latencies = interleaved_medians_ms(everything, args.repeats)
        results = {name: (latencies[name], peaks[name]) for name in everything}

        forward = results["forward"][0]
        print(f"{'case':<28}{'median ms':>10}{'x forward':>11}{'target':>8}{'peak MiB':>10}")
        for name, (latency, peak) in results.items():
            target = TARGETS.get(name)
            target_text = f"<={target}" if target else ""
            ratio = latency / forward
            print(f"{name:<28}{latency:>10.2f}{ratio:>11.2f}{target_text:>8}{peak:>10.0f}")
        verdicts = [
            f"{name}: {'ok' if results[name][0] / forward <= limit else 'MISSED'}"
            for name, limit in TARGETS.items()
        ]
        print("; ".join(verdicts))


if __name__ == "__main__":
    main()
