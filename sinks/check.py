"""Start-up check of an output location: fail before the model loads, not at the first flush."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import fsspec

from nlpstream.sinks.errors import SinkConfigError

# fsspec protocol -> the nlpstream extra that installs its file system
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure", "abfss": "azure", "az": "azure",
           "adl": "azure"}


def redact_url(url: str) -> str:
    """``url`` without any user:password part (never logged); secrets may hold '/', so all up to the last '@' goes."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^@]*@", r"\1***@", url)


def check_output(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise SinkConfigError when ``url`` cannot be written as configured.

    Object stores: the file system's package must be importable (the storage
    extras). Local folders: created when missing, and a probe file is written
    and removed. Remote stores are not contacted here (credentials may come
    later, an outage is retried by the job).
    """
    parts = url.split("::")  # chained URLs: every layer's file system must be importable
    protocols = [fsspec.core.split_protocol(part)[0] or "file" for part in parts]
    if len(parts) > 1 or protocols[0] not in ("file", "local"):
        for protocol in protocols:
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError as exc:
                extra = _EXTRAS.get(protocol)
                hint = f"pip install 'nlpstream[{extra}]'" if extra else "install the fsspec file system package it names"
                raise SinkConfigError(f"output {redact_url(url)}: {protocol}:// needs a package that is not installed "
                                      f"({exc}); {hint} (the container image has them all)") from None
            except ValueError as exc:
                raise SinkConfigError(f"output {redact_url(url)}: unknown storage protocol {protocol!r} "
                                      f"({exc})") from None
        return
    folder = Path(fsspec.core.split_protocol(url)[1]).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkConfigError(f"output folder {folder} cannot be created: {exc.strerror or exc}") from None
    probe = folder / f".nlpstream-write-check-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SinkConfigError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
