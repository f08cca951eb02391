"""Running ONNX graphs: onnxruntime sessions, the memory budget, deadlines and the batcher.

`session` wraps one onnxruntime session; `shared` builds a model's sessions on one copy of its
weights under the `memory` budget, in the node order `schedule` gives gradient graphs;
`batcher` joins single requests into batched runs; `deadline` carries a request's time limit.
May import: engines.errors. Nothing above it (graphs, models, methods) and nothing of HTTP.
"""
