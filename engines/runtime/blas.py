"""numpy's BLAS held to one thread around small products.

OpenBLAS wakes a thread per core for every call; beside onnxruntime's pools on a busy machine
the wake-ups cost far more than the work (Eigen-CAM's 49x1280 Gram matrix and its eigenvectors:
~85 ms threaded, ~2 ms on one thread). The limit is process-wide (threadpoolctl sets OpenBLAS's
thread count), so uses are serialised: each restores exactly what it found.
"""

import contextlib
import threading
from collections.abc import Iterator

from threadpoolctl import ThreadpoolController

_controller = ThreadpoolController()
_lock = threading.Lock()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    with _lock, _controller.limit(limits=1, user_api="blas"):
        yield
