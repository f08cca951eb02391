"""Gradient graphs for ONNX classifiers, built by reverse-mode differentiation of the graph.

`build_gradient_model` returns the forward graph plus a backward part fed by a `seed` input;
see `GradientSpec` for what it can return (a layer's activation and gradient, the input
gradient, guided backprop).
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
