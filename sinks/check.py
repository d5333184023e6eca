"""Start-up check of an output location: fail before the model loads, not at the first flush."""

from __future__ import annotations

import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec

from nlpstream.sinks.errors import SinkConfigError
from nlpstream.sinks.storage import open_fs, scrub, secret_values

PROBE_PREFIX = "_nlpstream_check-"  # '_': readers (Spark, DuckDB, pyarrow) skip it should one be left behind
PROBE_TIMEOUT_S = 60.0

# fsspec protocol -> the nlpstream extra that installs its file system
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure", "abfss": "azure", "az": "azure",
           "adl": "azure"}


def redact_url(url: str) -> str:
    """``url`` without any user:password part (never logged); secrets may hold '/', so all up to the last '@' goes."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^@]*@", r"\1***@", url)


def check_output(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise SinkConfigError when ``url`` cannot be written as configured.

    Object stores and other fsspec URLs: the file system's package must be
    importable (the storage extras); then, with ``storage_options`` and the
    environment's credentials, a probe object ``_nlpstream_check-...`` is
    written under the prefix, the prefix listed and the probe deleted: a
    missing bucket, wrong credentials, a missing permission or an unreachable
    endpoint fail here in one line (no secret in it) instead of at the first
    flush. That takes at most about a minute (the client's own retries).
    Chained URLs (``simplecache::s3://...``) are only checked for their
    packages. Local folders: created when missing, and a probe file is
    written and removed.
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
        if len(parts) == 1:
            _probe_remote(url, storage_options)
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


def _probe_remote(url: str, storage_options: dict[str, Any] | None) -> None:
    """Write, list and delete a probe object under ``url``; SinkConfigError (secrets scrubbed) when that fails."""
    secrets = secret_values(storage_options)
    shown = redact_url(url)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            fs, root = open_fs(url, storage_options)
            path = f"{root}/{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            fs.pipe_file(path, b"")
            try:
                fs.invalidate_cache()
                fs.glob(f"{root}/{PROBE_PREFIX}*")  # resuming needs listings
            finally:
                fs.rm(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - any failure of the client is reported below
            outcome.append(exc)

    worker = threading.Thread(target=probe, name="nlpstream-output-check", daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S)
    if not outcome:
        raise SinkConfigError(f"output {shown}: the storage did not answer within {PROBE_TIMEOUT_S:.0f}s "
                              "(check the endpoint: AWS_ENDPOINT_URL or output.storage_options)")
    exc = outcome[0]
    if exc is None:
        return
    detail = scrub(" ".join((str(exc) or type(exc).__name__).split()), secrets)
    if isinstance(exc, FileNotFoundError):
        hint = "not found (does the bucket exist?)"
    elif isinstance(exc, PermissionError):
        hint = ("access denied (check the credentials and permissions: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "or output.storage_options; the job needs to put, list and delete objects)")
    elif isinstance(exc, (TypeError, ValueError)):
        hint = "the storage options are not valid for this file system"
    else:
        hint = ("the storage cannot be reached (check the endpoint: AWS_ENDPOINT_URL or output.storage_options, "
                "and the network)")
    raise SinkConfigError(f"output {shown} cannot be written: {hint}: {type(exc).__name__}: {detail}")
