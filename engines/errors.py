"""The domain errors engines raise. The service maps each class to one HTTP status."""


class EngineError(Exception):
    """Base of every error an engine raises on purpose.

    `code` is a stable machine-readable identifier; the message is safe to show to callers.
    """

    code = "engine_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(EngineError):
    code = "model_not_found"


class ModelNotReady(EngineError):
    code = "model_not_ready"


class InvalidImage(EngineError):
    """The bytes claim a supported format but cannot be decoded (truncated, corrupt, lying)."""

    code = "invalid_image"


class UnsupportedImage(EngineError):
    """The bytes are not an image format we accept."""

    code = "unsupported_image"


class ImageTooLarge(EngineError):
    code = "image_too_large"


class ImageTooSmall(EngineError):
    code = "image_too_small"


class InvalidParameters(EngineError):
    code = "invalid_parameters"


class InvalidModel(EngineError):
    """A model file or its config cannot be used (raised while loading, never for a request)."""

    code = "invalid_model"


class InferenceFailed(EngineError):
    """onnxruntime failed on an input we had accepted: our fault, not the caller's."""

    code = "inference_failed"


class UnsupportedModel(EngineError):
    """The request needs something this model cannot give (e.g. a non-differentiable op)."""

    code = "unsupported_model"


class NoReluLikeOp(UnsupportedModel):
    """Guided backprop was asked of a model with no ReLU-like op on the path."""


class TooMuchWork(EngineError):
    """The request would cost more than the configured limits allow."""

    code = "too_much_work"


class DeadlineExceeded(EngineError):
    """The request's deadline passed; its onnxruntime work was terminated."""

    code = "deadline_exceeded"


class OverBudget(EngineError):
    """The memory budget (or the bounded graph builds) cannot take this work now; retry later."""

    code = "over_budget"


class Overloaded(EngineError):
    """The queue for this work is full; the caller should retry later."""

    code = "overloaded"
