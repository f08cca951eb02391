"""The models served: one loaded model, its layers, what it supports, the repository.

`loaded` is a model ready to run (normalised graph, forward session, prepared gradient graphs);
`layers` finds its feature maps and their layouts; `support` says per method whether it can
be explained and why not; `repository` loads, unloads and lists the model folders; `zoo`
builds the default model from packaged weights.
May import: engines.errors, engines.runtime, engines.graphs, engines.imaging.
"""
