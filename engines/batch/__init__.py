"""Whole datasets: `onnx-explain batch` explains every image of a folder, list or table with one
loaded model, locally or on Ray Data, and records each image's map files in a manifest.

`inputs` lists the images a job reads; `manifest` is the job's record (one JSON line an image,
written after its files, which is what a rerun resumes from); `job` explains images one by one
on worker threads whose model runs the model's own batcher joins; `on_ray` runs the same work in
a Ray Data actor pool.
May import: engines.errors, engines.runtime, engines.graphs, engines.imaging, engines.models,
engines.methods, engines.insight.
"""
