"""Exceptions of the sinks package."""


class SinkError(Exception):
    """Root of every error raised by a sink."""

    recoverable: bool = False


class SinkConfigError(SinkError):
    """The output cannot work as configured (a missing storage package, a folder that cannot be written)."""


class SinkWriteError(SinkError):
    """Writing failed (read-only or full disk, object store down); retry later."""

    recoverable = True


class SinkBackpressure(SinkError):
    """The sink cannot take more rows now; try again after ``retry_after`` seconds."""

    recoverable = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
