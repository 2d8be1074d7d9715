"""Atomic file writes: a temporary file in the target's folder, checked, then renamed over the target."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes, check: Callable[[str], None] | None = None) -> Path:
    """Write ``data`` to ``path`` or leave it untouched: ``check(tmp_path)`` runs on the written temporary
    file before the rename; on any failure the temporary file is removed. The file gets the permissions
    a plain ``open(path, "w")`` would give (mkstemp's are owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
