"""Graphs built from a model: gradient graphs by reverse-mode differentiation, and the rest.

`build_gradient_model` returns the forward graph plus a backward part fed by a `seed` input;
see `GradientSpec` for what it can return (a layer's activation and gradient, the input
gradient, guided backprop). `autodiff` drives the differentiation with the rules of
`derivatives`, `pointwise`, `spatial` and `structural`; `normalize` prepares a model for it;
`prepared` keeps a model's gradient sessions (built, cached on disk, batched); `occlusion`
builds the in-graph occlusion prefix and `heads` finds a GAP + linear classifier head.
May import: engines.errors, engines.runtime.
"""

from engines.graphs.autodiff import (
    ACTIVATION,
    GRAD_INPUT,
    GRAD_LAYER,
    SEED,
    GradientSpec,
    build_gradient_model,
    supported_ops,
)

__all__ = [
    "ACTIVATION",
    "GRAD_INPUT",
    "GRAD_LAYER",
    "SEED",
    "GradientSpec",
    "build_gradient_model",
    "supported_ops",
]
