"""Model-insight views: model summary, first-layer filters, layer activations (`views`) and
activation maximization (`maximize`).

May import: engines.errors, engines.runtime, engines.graphs, engines.imaging, engines.models,
engines.methods.
"""
