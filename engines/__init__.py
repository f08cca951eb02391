"""Runtime and explanation engines. Nothing in here knows about HTTP.

Rooms, each importing only the ones before it (tests/test_layout.py checks):
`errors` (the one error hierarchy), `runtime` (onnxruntime sessions, memory budget, deadlines,
batcher), `graphs` (differentiation and every graph built from a model), `imaging` (decode,
preprocess, render), `models` (a loaded model, its layers and support, the repository),
`methods` (the explanation methods), `insight` (model-insight views) and `batch` (whole
datasets, in-process or on Ray).
"""

import os

# OpenCV reads its decoder pixel limit once, when cv2 is first imported; every engine module
# imports cv2 after this package. It backs up the header checks in engines.imaging.decode.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))
