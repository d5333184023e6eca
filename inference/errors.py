"""Exceptions of the inference package."""


class InferenceError(Exception):
    """Root of every error raised by the inference package."""

    recoverable: bool = False


class ModelLoadError(InferenceError):
    """A model or its tokenizer cannot be loaded (missing, corrupted, unsupported)."""


class UnsafeModelError(ModelLoadError):
    """Refused for safety: pickle-only weights or code that would have to be run."""


class DeviceError(InferenceError):
    """A device spec is invalid, or no device replica is live.

    Never a property of the input: a caller must not dead-letter texts for it
    (the stream job stops without committing them, and a restart resumes).
    """


class NoLiveDeviceError(DeviceError):
    """Every device replica failed while running (none answers its probe). Restarting may help."""

    recoverable = True


class AgreementError(DeviceError):
    """At start-up a replica's labels on the fixed sample agree with fp32 less than ``min_agreement``."""


class TextError(InferenceError):
    """One text cannot be classified (the tokenizer or model raised on it alone).

    ``index`` is its position in the caller's input.
    """

    recoverable = True

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
