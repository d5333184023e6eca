"""The file system of an output location, and keeping its secrets out of messages.

Used by the Parquet sink and the start-up check (never by other packages).
Credentials and endpoint come from ``storage_options`` (passed to fsspec as
they are) or, for ``s3://``, from the standard AWS environment that botocore
reads (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``); ``AWS_REGION``, which botocore
does not read, is used as the region when neither the options nor
``AWS_DEFAULT_REGION`` name one.

Every value of ``storage_options`` counts as a secret: :func:`scrub` removes
those values, and the AWS secret key and session token of the environment,
from any text before it is logged or raised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import fsspec

# Stores where one PUT (or a completed multipart/block upload) is atomic: an object is visible whole or not at
# all, and a rename is a copy plus a delete. The sink writes their final names directly.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MIN_SECRET_LEN = 4  # shorter values (true, 1, us) would blank out ordinary words


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` ('file' for a plain path); the outermost layer of a chained URL."""
    return fsspec.core.split_protocol(url.split("::")[0])[0] or "file"


def fs_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments the file system of ``url`` is built with: the options plus AWS_REGION on s3."""
    options = dict(storage_options or {})
    region = os.environ.get("AWS_REGION")
    if protocol_of(url) in ("s3", "s3a") and region and not os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs = dict(options.get("client_kwargs") or {})
        if "region_name" not in client_kwargs:
            client_kwargs["region_name"] = region
            options["client_kwargs"] = client_kwargs
    return options


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(file system, root path without trailing '/')`` of ``url``; raises what fsspec raises."""
    fs, root = fsspec.core.url_to_fs(url, **fs_options(url, storage_options))
    return fs, root.rstrip("/")


def is_object_store(fs: Any) -> bool:
    """True when ``fs`` writes whole objects atomically (S3, GCS, Azure Blob)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(OBJECT_STORE_PROTOCOLS.intersection(protocols))


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, str):
        yield value


def secret_values(storage_options: dict[str, Any] | None) -> list[str]:
    """Every string in ``storage_options`` and the AWS secrets of the environment, longest first."""
    found = set(_leaves(storage_options or {}))
    found.update(os.environ.get(name, "") for name in _ENV_SECRETS)
    return sorted((s for s in found if len(s) >= _MIN_SECRET_LEN), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret (and any user:password part of a URL) replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^@/\s]*:[^@\s]*@", r"\1***@", text)
