"""Captum's Lime and KernelShap on the weighted-region model, for tests/test_perturbation.py.

Runs in the zoo venv (torch, captum, scikit-learn): `python captum_superpixels.py IN OUT`. IN is
an npz with the input tensor, the model's region weights, the superpixels (feature mask), the
baseline and each method's on/off samples; the model is the same function in torch (logits
[s, -s], s = sum(weights * x)). Captum draws its own samples, so each attribute() call is fed
ours through its perturbation hook; everything else (the cosine kernel, the Shapley end weights,
scikit-learn's Lasso and LinearRegression) is Captum's own. OUT gets each method's map.
"""

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnLasso
from captum.attr import KernelShap, Lime


def main() -> int:
    data = np.load(sys.argv[1])
    weights = torch.from_numpy(data["weights"])
    probability = bool(data["probability"])

    def forward(batch: torch.Tensor) -> torch.Tensor:
        s = (batch * weights).sum(dim=(1, 2, 3))
        logits = torch.stack([s, -s], dim=1)
        return torch.softmax(logits, dim=1) if probability else logits

    inputs = torch.from_numpy(data["tensor"])
    baselines = torch.from_numpy(data["baseline"])
    mask = torch.from_numpy(data["segments"].astype(np.int64))[None, None]
    out: dict[str, np.ndarray] = {}
    for method in ("lime", "kernelshap"):
        kept = torch.from_numpy(data[f"{method}_kept"].astype(np.int64))

        def ours(_: Any, kept: torch.Tensor = kept, **__: Any) -> Iterator[torch.Tensor]:
            yield from (row[None] for row in kept)

        if method == "lime":
            explainer: Lime = Lime(
                forward, interpretable_model=SkLearnLasso(alpha=float(data["alpha"]))
            )
        else:
            explainer = KernelShap(forward)
        explainer.perturb_func = ours
        attributions = explainer.attribute(
            inputs,
            baselines=baselines,
            target=0,
            feature_mask=mask,
            n_samples=kept.shape[0],
            perturbations_per_eval=64,
        )
        out[method] = attributions[0, 0].double().numpy()
    np.savez(sys.argv[2], lime=out["lime"], kernelshap=out["kernelshap"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
