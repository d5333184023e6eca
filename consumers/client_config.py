"""Connection settings shared by consumers and producers (plain data).

Secrets are passed in as plain strings at the last moment by the job; this
dataclass never appears in logs (its repr hides them).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """How to reach the brokers: bootstrap list, security protocol, SASL/TLS."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    client_id: str = "nlpstream"

    def kafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients (only those set)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


def connect_error(connection: ConnectionSettings, exc: BaseException) -> str:
    """A clear message for a client that could not be created (no secrets in it)."""
    message = f"cannot connect to Kafka at {connection.bootstrap_servers} ({connection.security_protocol}): {exc}"
    if isinstance(exc, ssl.SSLError):
        message += ("; the TLS handshake failed: check ssl_cafile (the CA of the brokers' certificates) and, "
                    "when the brokers require client certificates, ssl_certfile/ssl_keyfile/ssl_password")
    return message


def wait_for_kafka(connection: ConnectionSettings, timeout_s: float, log: Any = None) -> None:
    """Return once a client can bootstrap from the brokers; retry with backoff for up to ``timeout_s``.

    Only "cannot reach a broker" is retried (the brokers may still be
    starting); a refused TLS handshake or SASL login fails at once. Raises
    KafkaUnavailableError when the time is up.
    """
    import logging
    import time

    from kafka import KafkaConsumer
    from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NoBrokersAvailable

    from nlpstream.consumers.errors import KafkaUnavailableError

    log = log or logging.getLogger(__name__)
    deadline = time.monotonic() + timeout_s
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        try:
            KafkaConsumer(**connection.kafka_kwargs(), enable_auto_commit=False).close()
            if attempt > 1:
                log.info("Kafka at %s answers (attempt %d)", connection.bootstrap_servers, attempt)
            return
        except (NoBrokersAvailable, KafkaConnectionError, KafkaTimeoutError, ConnectionError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                hint = ""
                if connection.security_protocol != "PLAINTEXT":
                    hint = (f"; with {connection.security_protocol}, also check that the listener speaks that "
                            "protocol (a TLS or SASL mismatch looks like an unreachable broker)")
                raise KafkaUnavailableError(f"{connect_error(connection, exc)} (waited {timeout_s:.0f}s, "
                                            f"{attempt} attempts; kafka.startup_timeout sets how long){hint}") from exc
            wait = min(delay, left)
            log.info("waiting for Kafka at %s: %s; retrying in %.0fs (attempt %d, giving up in %.0fs)",
                     connection.bootstrap_servers, type(exc).__name__, wait, attempt, left)
            time.sleep(wait)
            delay = min(delay * 2, 15.0)
        except (KafkaError, OSError) as exc:  # TLS refused, SASL login failed: waiting would not help
            raise KafkaUnavailableError(connect_error(connection, exc)) from exc


class _CreatedOnFirstUse:
    """Logs kafka-python's "topic not found / not available during auto-create" at INFO for topics the job writes."""

    MESSAGES = ("Topic %s not found in cluster metadata", "Topic %s is not available during auto-create initialization")

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics

    def filter(self, record: Any) -> bool:
        import logging

        if record.msg in self.MESSAGES and record.args and record.args[0] in self.topics:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_created = _CreatedOnFirstUse(set())


def quiet_topic_creation(topics: Any) -> None:
    """A topic the job writes to (dead letters, alerts) and the broker creates on first use is no error.

    kafka-python logs that normal event at ERROR (and WARNING) on the
    ``kafka.cluster`` logger; for these topics it is logged at INFO (a topic
    that cannot be created still fails the send, which the job reports).
    """
    import logging

    _created.topics.update(t for t in topics if t)
    logger = logging.getLogger("kafka.cluster")
    if _created not in logger.filters:
        logger.addFilter(_created)
