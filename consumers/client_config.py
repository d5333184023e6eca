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
