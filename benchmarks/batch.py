"""`onnx-explain batch`: images per second with one image in flight against several, whose
single-image runs the model's batcher joins, and against several whose runs stay one image
each (`ONNX_EXPLAIN_MAX_BATCH=1`: decoding and rendering overlap the runs, nothing more).

    python -m benchmarks.batch [--method gradcam] [--images 32] [--rounds 3] [--provider cpu]

Same model (EfficientNet-Lite0), same images (a photo shifted, PNG files); the cases alternate
round by round. Prints images/s of each, the ratios to one image in flight, and the sizes of the
gradient runs the batcher formed.
"""

import argparse
import dataclasses
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import default_model_folder
from engines.batch.inputs import ImageItem
from engines.batch.job import BatchSpec, BatchWorker
from engines.methods.registry import EXPLAINERS
from engines.runtime.batcher import BatchPolicy
from engines.runtime.session import RuntimeOptions
from tests.images import encode, photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="gradcam", choices=sorted(EXPLAINERS))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--provider", choices=["cpu", "auto", "cuda"], default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = default_model_folder(root / "models")
        base = photo("chelsea")
        items = []
        for i in range(args.images):
            path = root / f"image-{i}.png"
            path.write_bytes(encode(np.roll(base, 11 * i, axis=1)))
            items.append(ImageItem(path.name, path))
        spec = BatchSpec(
            model_name=folder.name,
            model_folder=folder,
            method=args.method,
            params=EXPLAINERS[args.method].params_model(),
            output_dir=root / "maps",
            runtime=RuntimeOptions(providers=args.provider, intra_op_threads=args.threads),
            cache_dir=root / "cache",
        )
        worker = BatchWorker(spec)  # the job's own choice
        batched = worker.images_in_flight
        joined = BatchWorker(
            dataclasses.replace(
                spec, batch_policy=BatchPolicy(window_seconds=None, max_rows=batched)
            )
        )
        unjoined = BatchWorker(dataclasses.replace(spec, batch_policy=BatchPolicy(max_rows=1)))
        rows: Counter[int] = Counter()
        joined.model.gradients.on_batch = lambda count, queued: rows.update([count])
        cases = {
            "1 image in flight": (unjoined, 1),
            f"{batched} in flight, runs joined": (joined, batched),
            f"{batched} in flight, runs of 1": (unjoined, batched),
        }
        for each, _ in cases.values():
            list(each.explain_all(items[:batched]))  # builds and warms the gradient session
        rows.clear()
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (each, in_flight) in cases.items():
                each.images_in_flight = in_flight
                start = time.perf_counter()
                list(each.explain_all(items))
                seconds[name].append(time.perf_counter() - start)
        rate = {name: args.images / float(np.median(times)) for name, times in seconds.items()}
        provider = worker.model.session.provider
        policy = worker.model.batch_policy
        default = "runs of 1" if policy is None or policy.max_rows == 1 else "runs joined"
        print(f"{args.method} on {folder.name} ({provider}), {args.images} images:")
        print(f"  the job's default: {batched} in flight, {default}")
        alone = rate["1 image in flight"]
        for name, value in rate.items():
            print(f"  {name:<28} {value:6.1f} images/s  {value / alone:.2f}x")
        print(f"  gradient runs by rows when joined (all rounds): {dict(sorted(rows.items()))}")


if __name__ == "__main__":
    main()
