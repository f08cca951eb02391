"""Issue 18's speed targets on EfficientNet-Lite0 at 224x224: Score-CAM, Ablation-CAM, Eigen-CAM,
Eigen-Grad-CAM, DeepLift and GradientSHAP.

    python -m benchmarks.cams [--threads N] [--repeats N] [--scorecam-layer L] [--peers PYTHON]
        [--spin] [--methods M ...]

Per method: its passes, its time, and the time of the same passes as plain batched runs of the
same sessions at the same batch sizes (forward runs, the part after the layer, or gradient runs);
the target is at most 1.1x. With `--peers` naming a python with torch, grad-cam and
efficientnet-lite-pytorch (the zoo venv: /work/main/.venv-zoo/bin/python, or `make .venv-zoo`),
pytorch-grad-cam's Score-CAM and Ablation-CAM run on the same weights in the same run
(benchmarks.cams_peers, a subprocess); the goal is at least 3x faster.
"""

import argparse
import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import default_model_folder, interleaved_medians_ms
from engines.graphs.prepared import GraphKey
from engines.imaging.decode import preprocess
from engines.methods.forward_cam import AblationCam, ScoreCam
from engines.methods.pipeline import WorkLimits, baseline_tensor, seeds_for
from engines.methods.registry import EXPLAINERS
from engines.methods.saliency import CHUNK_ROWS
from engines.models.loaded import LoadedModel
from engines.runtime.session import RuntimeOptions
from schemas.params import GradientShapParams

TARGET = 281
HEAD = "head/relu6"


def forward_cam_plain(
    model: LoadedModel, tensor: np.ndarray, layer: str, ablation: bool, limits: WorkLimits
) -> tuple[int, Callable[[], None]]:
    """Score-CAM's or Ablation-CAM's passes as plain runs: the clean run exposing the layer, then
    ready-made copies (of the input or of the layer) in the same batches."""
    info = model.layer(layer)
    activation, _ = model.intermediates(tensor, (layer, model.output_name))
    channels = activation.shape[info.channel_axis]
    explainer = AblationCam() if ablation else ScoreCam()
    batch = explainer.batch(model, tensor, info, activation, limits)
    rows = np.repeat(activation if ablation else tensor, batch, axis=0)

    def plain() -> None:
        model.intermediates(tensor, (layer, model.output_name))
        for start in range(0, channels, batch):
            chunk = rows[: min(batch, channels - start)]
            if ablation:
                model.run_suffix(layer, chunk, [])
            else:
                model.forward(chunk)

    return channels + 1, plain


def gradient_plain(
    model: LoadedModel, tensor: np.ndarray, layer: str | None, deeplift: bool = False
) -> Callable[[], None]:
    key = GraphKey(
        layer, wrt_input=layer is None, guided=False, top_k_seeds=False, deeplift=deeplift
    )
    seeds = seeds_for([TARGET], model.num_classes)
    reference = baseline_tensor(model, tensor, "black") if deeplift else None

    def plain() -> None:
        model.gradients.run(key, model.input_name, tensor, seeds=seeds, reference=reference)

    return plain


def gradientshap_plain(model: LoadedModel, tensor: np.ndarray, samples: int) -> Callable[[], None]:
    key = GraphKey(None, wrt_input=True, guided=False, top_k_seeds=False)
    rows = np.repeat(tensor, samples, axis=0)
    per_run = model.rows_per_run(CHUNK_ROWS, model.gradients.activation_bytes)

    def plain() -> None:
        model.forward(tensor)
        for start in range(0, samples, per_run):
            chunk = rows[start : start + per_run]
            seeds = seeds_for([TARGET] * chunk.shape[0], model.num_classes)
            model.gradients.run(key, model.input_name, chunk, seeds=seeds)

    return plain


def peer_seconds(python: str, tensor: np.ndarray, layer: str, threads: int) -> dict[str, float]:
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        source, destination = Path(scratch) / "in.npz", Path(scratch) / "out.json"
        np.savez(source, tensor=tensor, target=TARGET, layer=layer, threads=threads)
        subprocess.run(
            [python, "-m", "benchmarks.cams_peers", str(source), str(destination)],
            cwd=root,
            check=True,
            stderr=subprocess.DEVNULL,
        )
        seconds: dict[str, float] = json.loads(destination.read_text())
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--scorecam-layer", default=HEAD, help="Score-CAM's layer (one pass per channel)"
    )
    parser.add_argument("--peers", default="", help="a python with torch and grad-cam")
    parser.add_argument(
        "--spin", action="store_true", help="let onnxruntime's threads spin (the service: off)"
    )
    parser.add_argument("--methods", nargs="*", default=None, help="a subset of the methods")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = default_model_folder(Path(scratch) / "models")
        options = RuntimeOptions(
            providers="cpu", intra_op_threads=args.threads, spin_wait=args.spin
        )
        model = LoadedModel("efficientnet-lite0", folder, options)
        import skimage.data

        cat: np.ndarray = skimage.data.chelsea()  # type: ignore[no-untyped-call]
        tensor = preprocess([cat], model.config.input)
        limits = WorkLimits()
        score_passes, score_plain = forward_cam_plain(
            model, tensor, args.scorecam_layer, False, limits
        )
        ablation_passes, ablation_plain = forward_cam_plain(model, tensor, HEAD, True, limits)
        shap_samples = GradientShapParams().samples

        def forward_once() -> None:
            model.forward(tensor)

        cases: dict[str, tuple[str, dict[str, object], Callable[[], None]]] = {
            "scorecam": (
                f"{score_passes} forward",
                {"layer": args.scorecam_layer},
                score_plain,
            ),
            "ablationcam": (
                f"1 forward + {ablation_passes - 1} after the layer",
                {},
                ablation_plain,
            ),
            "eigencam": ("1 forward", {}, forward_once),
            "eigengradcam": ("1 layer gradient", {}, gradient_plain(model, tensor, HEAD)),
            "deeplift": (
                "1 DeepLift gradient",
                {},
                gradient_plain(model, tensor, None, deeplift=True),
            ),
            "gradientshap": (
                f"1 forward + {shap_samples} input gradients",
                {},
                gradientshap_plain(model, tensor, shap_samples),
            ),
        }
        print(f"provider: {model.session.provider}, threads: {args.threads or 'all'}")
        print(f"{'method':14} {'passes':36} {'ours s':>9} {'plain s':>9} {'ratio':>7}")
        ours_seconds = {}
        for method, (passes, params, plain) in cases.items():
            if args.methods is not None and method not in args.methods:
                continue
            parsed = EXPLAINERS[method].params_model.model_validate(params)

            def ours(method: str = method, parsed: object = parsed) -> None:
                EXPLAINERS[method].explain(model, tensor, [TARGET], 1, parsed, limits)

            repeats = 1 if method in ("scorecam", "ablationcam") else args.repeats
            warmup = 1 if method in ("scorecam", "ablationcam") else 3
            medians = interleaved_medians_ms({"ours": ours, "plain": plain}, repeats, warmup)
            mine, theirs = medians["ours"] / 1000, medians["plain"] / 1000
            ours_seconds[method] = mine
            print(f"{method:14} {passes:36} {mine:9.3f} {theirs:9.3f} {mine / theirs:7.3f}")
        print("target: ratio <= 1.1")
        if args.peers:
            peers = peer_seconds(args.peers, tensor, args.scorecam_layer, args.threads)
            for method in ("scorecam", "ablationcam"):
                if method not in ours_seconds:
                    continue
                print(
                    f"pytorch-grad-cam {method:12} {peers[method]:9.3f} s; ours "
                    f"{ours_seconds[method]:.3f} s: {peers[method] / ours_seconds[method]:.1f}x "
                    "faster (goal >= 3x)"
                )


if __name__ == "__main__":
    main()
