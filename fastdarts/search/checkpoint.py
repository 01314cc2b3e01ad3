"""Checkpoints written atomically: a crash mid-write leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch

from fastdarts.errors import UsageError


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save obj to path through a temporary file in the same folder, fsynced, then renamed over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created as open() creates files (0o666 less the umask), not 0o600 as tempfile's are: os.replace keeps the mode.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_atomic`; a missing or unreadable file is a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint to resume at {path}; run without --resume to start a new search")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        raise UsageError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                         "delete it to start over") from e  # fmt: skip
    if not isinstance(ckpt, dict) or "epoch" not in ckpt or "model" not in ckpt:
        raise UsageError(f"{path} is not a fastdarts search checkpoint")
    return ckpt
