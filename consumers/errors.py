"""Exceptions of the consumers package (one root, recoverable vs fatal explicit)."""


class ConsumerError(Exception):
    """Root of every error raised by the consumers package."""

    recoverable: bool = False


DECODE_KINDS = ("empty_value", "invalid_utf8", "blank_text", "malformed_json", "not_an_object", "missing_text",
                "text_not_string", "no_magic_byte", "unknown_schema_id", "schema_mismatch")


class DecodeError(ConsumerError):
    """A record cannot be turned into text; it belongs in the dead-letter topic.

    ``kind`` is a short stable name of the failure (``invalid_utf8``,
    ``empty_value``, ``malformed_json``, ``not_an_object``, ``missing_text``,
    ``text_not_string``, ``blank_text``; for the Confluent wire format also
    ``no_magic_byte``, ``unknown_schema_id``, ``schema_mismatch``) used in DLQ
    headers and metrics.
    """

    recoverable = True

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class KafkaUnavailableError(ConsumerError):
    """The broker cannot be reached right now; retrying later may succeed."""

    recoverable = True


class KafkaLocalError(ConsumerError):
    """The local development broker could not be installed, started or stopped."""
