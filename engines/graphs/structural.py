"""Backward rules of ops that move, pick or resample values: splits, slices, gathers, resizes,
normalisations over several axes and batched products."""

from collections.abc import Callable

from engines.graphs.context import Grads, NodeGrad

Rule = Callable[[NodeGrad], Grads]

RULES: dict[str, Rule] = {}
