"""Backward rules of elementwise ops, reductions and activations beyond those in derivatives."""

from collections.abc import Callable

from engines.graphs.context import Grads, NodeGrad

Rule = Callable[[NodeGrad], Grads]

RULES: dict[str, Rule] = {}
