"""The explanation methods: the shared pipeline, one module per family, and their registry.

`pipeline` holds what every method shares (targets, limits, the explain call); `cam`,
`classic_cam`, `saliency` and `occlusion` are the families; `registry` maps the names requests
use to them.
May import: engines.errors, engines.runtime, engines.graphs, engines.imaging, engines.models.
"""
