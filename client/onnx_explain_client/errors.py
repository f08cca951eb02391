"""What the client raises: one base class, with the service's own answers as a subclass."""


class ClientError(Exception):
    """Anything that kept a call from giving a result: bad input, no connection, odd answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectionFailed(ClientError):
    """The service could not be reached, or did not answer in time."""


class ServiceError(ClientError):
    """The service answered with an error: `{"error": {"code": ..., "message": ...}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})"
