"""Durable local writes: temporary name, fsync, atomic rename, folder fsync (one place for the sinks and jobs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(temp: str | os.PathLike[str], final: str | os.PathLike[str], write: Callable[[BinaryIO], object],
                  folder: str | os.PathLike[str] | None = None) -> None:
    """``write(fh)`` into ``temp``, fsync it, rename it to ``final`` and fsync ``folder`` (when given)."""
    with open(temp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, final)
    if folder is not None:
        fsync_dir(folder)
