"""pytorch-grad-cam's Score-CAM and Ablation-CAM timed on EfficientNet-Lite0, for benchmarks.cams.

Runs in a venv with torch, grad-cam and efficientnet-lite-pytorch (the zoo venv):
`python -m benchmarks.cams_peers IN.npz OUT.json`, IN holding `tensor`, `target`, `layer`
(Score-CAM's) and `threads`. Both run as their users run them: the whole network per pass, at
grad-cam's default batch sizes (16 for Score-CAM, 32 for Ablation-CAM).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tests.zoo.peer_references import block_module, load_network


def main() -> None:
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    source, destination = Path(sys.argv[1]), Path(sys.argv[2])
    with np.load(source) as data:
        tensor = torch.from_numpy(data["tensor"])
        target = int(data["target"])
        layer = str(data["layer"])
        threads = int(data["threads"])
    if threads:
        torch.set_num_threads(threads)
    network = load_network()
    targets = [ClassifierOutputTarget(target)]
    seconds = {}
    with ScoreCAM(network, [block_module(network, layer)]) as cam:
        start = time.perf_counter()
        cam(tensor, targets=targets)
        seconds["scorecam"] = time.perf_counter() - start
    with AblationCAM(network, [block_module(network, "head/relu6")]) as cam:
        start = time.perf_counter()
        cam(tensor, targets=targets)
        seconds["ablationcam"] = time.perf_counter() - start
    destination.write_text(json.dumps(seconds))


if __name__ == "__main__":
    main()
