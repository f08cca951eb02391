"""Runtime and explanation engines. Nothing in here knows about HTTP."""

import os

# OpenCV reads its decoder pixel limit once, when cv2 is first imported; every engine module
# imports cv2 after this package. It backs up the header checks in engines.images.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))
