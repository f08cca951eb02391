"""Issue 12's speed targets, per exported architecture: Grad-CAM and saliency against a forward.

    python -m benchmarks.zoo [--repository DIR] [--size 224] [--threads N] [--repeats N]
                             [--only NAME ...]

Without `--repository`, the zoo of the model-zoo test is exported first at `--size` (224: what
is deployed; the test's 64x64 models run in well under a millisecond, where fixed per-run
costs dominate every ratio), by tests/zoo/export.py in the zoo venv (`make .venv-zoo`; its
python from ONNX_EXPLAIN_ZOO_PYTHON or .venv-zoo/). Each
model is measured in a process of its own, so its peak resident memory is its own: the time
to build its Grad-CAM and saliency graphs, the median latency of one image's forward pass, and
Grad-CAM (default layer, top-1) and saliency (top-1) as ratios to it.
Targets: Grad-CAM <= 1.2x the forward on every architecture, median saliency <= 3x.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved_medians_ms, peak_rss_mib, reset_peak_rss
from engines.graphs.prepared import GraphKey
from engines.models.loaded import MODEL_FILE, LoadedModel
from engines.runtime.session import RuntimeOptions

GRADCAM_TARGET = 1.2
SALIENCY_MEDIAN_TARGET = 3.0
ROOT = Path(__file__).resolve().parent.parent


def measure(folder: Path, threads: int, repeats: int) -> dict[str, float | str]:
    """One model's figures (run in a child process)."""
    options = RuntimeOptions(providers="cpu", intra_op_threads=threads)
    with tempfile.TemporaryDirectory() as cache:
        reset_peak_rss()
        started = time.perf_counter()
        model = LoadedModel(folder.name, folder, options, cache_dir=Path(cache))
        loaded = time.perf_counter() - started
        spec = model.config.input
        dims = spec.image_dims
        tensor = np.random.default_rng(0).standard_normal((1, *dims)).astype(np.float32)
        graphs = model.gradients
        cam = GraphKey(model.default_layer, wrt_input=False, guided=False, top_k_seeds=True)
        saliency = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=True)
        started = time.perf_counter()
        for key in (cam, saliency):
            graphs.session(key)
        built = time.perf_counter() - started
        latencies = interleaved_medians_ms(
            {
                "forward": lambda: model.forward(tensor),
                "gradcam": lambda: graphs.run(cam, model.input_name, tensor, top_k=1),
                "saliency": lambda: graphs.run(saliency, model.input_name, tensor, top_k=1),
            },
            repeats,
        )
        return {
            "model": folder.name,
            "load_s": loaded,
            "build_s": built,
            **{f"{name}_ms": value for name, value in latencies.items()},
            "peak_mib": peak_rss_mib(),
        }


def _export_zoo(target: Path, only: list[str], size: int) -> Path:
    python = os.environ.get("ONNX_EXPLAIN_ZOO_PYTHON") or str(ROOT / ".venv-zoo/bin/python")
    if not Path(python).is_file():
        sys.exit(f"no zoo venv at {python}: run `make .venv-zoo` or pass --repository")
    command = [python, str(ROOT / "tests/zoo/export.py"), str(target), "--no-references"]
    if only:
        command += ["--only", *only]
    environment = {**os.environ, "ONNX_EXPLAIN_ZOO_SIZE": str(size)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, help="a model repository (default: export)")
    parser.add_argument("--only", nargs="*", default=[], help="model names to measure")
    parser.add_argument("--size", type=int, default=224, help="input side of the exports")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a child's model
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.threads, args.repeats)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        repository = args.repository or _export_zoo(Path(scratch) / "zoo", args.only, args.size)
        folders = sorted(p.parent for p in repository.glob(f"*/{MODEL_FILE}"))
        if args.only:
            folders = [f for f in folders if any(f.name.startswith(o) for o in args.only)]
        print(f"provider: CPUExecutionProvider, threads: {args.threads}")
        header = f"{'model':<34}{'build s':>8}{'fwd ms':>8}{'cam x':>7}{'sal x':>7}{'peak MiB':>9}"
        print(header)
        rows = []
        for folder in folders:
            child = subprocess.run(
                [
                    *(sys.executable, "-m", "benchmarks.zoo", "--one", str(folder)),
                    *("--threads", str(args.threads), "--repeats", str(args.repeats)),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if child.returncode != 0:
                reason = (child.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{folder.name:<34} failed: {reason}")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            cam = row["gradcam_ms"] / row["forward_ms"]
            saliency = row["saliency_ms"] / row["forward_ms"]
            print(
                f"{row['model']:<34}{row['build_s']:>8.2f}{row['forward_ms']:>8.2f}"
                f"{cam:>7.2f}{saliency:>7.2f}{row['peak_mib']:>9.0f}"
            )
        if not rows:
            return
        cams = [r["gradcam_ms"] / r["forward_ms"] for r in rows]
        saliencies = [r["saliency_ms"] / r["forward_ms"] for r in rows]
        worst = max(cams)
        median = statistics.median(saliencies)
        print(
            f"gradcam worst {worst:.2f}x (target <= {GRADCAM_TARGET}): "
            f"{'ok' if worst <= GRADCAM_TARGET else 'MISSED'}; "
            f"saliency median {median:.2f}x (target <= {SALIENCY_MEDIAN_TARGET}): "
            f"{'ok' if median <= SALIENCY_MEDIAN_TARGET else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
