"""Issue 18's speed target for the black-box methods (RISE, LIME, KernelSHAP) on
EfficientNet-Lite0 at 224x224.

    python -m benchmarks.perturbation [--threads N] [--repeats N] [--passes N] [--methods ...]

Per method: its passes, the whole map's time (masks or segmentation, copies, inference, the
linear fit), and the time of the same number of images (plus the clean image) pushed through
the same session in plain batches of the same size; the target is at most 1.1x. `--passes`
sets RISE's masks and LIME's and KernelSHAP's samples (the defaults are 4000 and 1000; fewer
keep the run short on a small machine: the ratio does not depend on them).
"""

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import default_model_folder, interleaved_medians_ms
from engines.imaging.decode import preprocess
from engines.methods.occlusion import batch_size
from engines.methods.pipeline import WorkLimits
from engines.methods.registry import EXPLAINERS
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions

TARGET = 281  # tabby cat
PASSES_PARAM = {"rise": "masks", "lime": "samples", "kernelshap": "samples"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", type=int, default=500, help="masks or samples per map")
    parser.add_argument("--provider", choices=["cpu", "auto", "cuda"], default="cpu")
    parser.add_argument("--methods", nargs="+", choices=list(PASSES_PARAM), default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = default_model_folder(Path(scratch) / "models")
        options = RuntimeOptions(providers=args.provider, intra_op_threads=args.threads)
        model = LoadedModel("efficientnet-lite0", folder, options)
        import skimage.data

        cat: np.ndarray = skimage.data.chelsea()  # type: ignore[no-untyped-call]
        tensor = preprocess([cat], model.config.input)
        limits = WorkLimits(max_passes=max(args.passes, WorkLimits().max_passes))
        batch = model.rows_per_run(
            batch_size(tensor[0].nbytes, limits.memory_budget_bytes), model.activation_bytes
        )
        images = np.repeat(tensor, batch, axis=0)
        print(f"provider: {model.session.provider}, threads: {args.threads or 'all'}")
        print(f"batches of {batch}, {args.repeats} repeats (medians)")
        forward = model.forward
        in_forward = [0.0]

        def timed_forward(batch: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            try:
                return forward(batch)
            finally:
                in_forward[0] += time.perf_counter() - start

        print(
            f"{'method':<11} {'passes':>6} {'map s':>8} {'plain s':>8} {'ratio':>6} "
            f"{'outside forward':>16}"
        )
        for method in args.methods or list(PASSES_PARAM):
            explainer = EXPLAINERS[method]
            params: Any = explainer.params_model.model_validate({PASSES_PARAM[method]: args.passes})
            passes = args.passes

            def plain_batches(passes: int = passes) -> None:
                model.forward(tensor)
                for start in range(0, passes, batch):
                    model.forward(images[: min(batch, passes - start)])

            def explain_map(explainer: Any = explainer, params: Any = params) -> None:
                explainer.explain(model, tensor, [TARGET], 1, params, limits)

            medians = interleaved_medians_ms(
                {"ours": explain_map, "plain": plain_batches}, args.repeats, warmup=1
            )
            ours, plain = medians["ours"] / 1000, medians["plain"] / 1000
            model.forward = timed_forward  # type: ignore[method-assign]
            in_forward[0] = 0.0
            start = time.perf_counter()
            explain_map()
            whole = time.perf_counter() - start
            model.forward = forward  # type: ignore[method-assign]
            outside = 1 - in_forward[0] / whole
            print(
                f"{method:<11} {passes:>6} {ours:8.3f} {plain:8.3f} {ours / plain:6.3f} "
                f"{outside:15.1%}"
            )
        print("target: ratio map / plain batches <= 1.1")


if __name__ == "__main__":
    main()
