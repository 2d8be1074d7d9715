"""The files a run writes: one rule checked before any work (``check_writes``), and atomic writes (a
temporary file in the target's folder, checked, then renamed over the target)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import BadInputError, OutputExistsError, StorageError

# errno values that mean "no room to write", not a bug: said in one line (exit 2)
STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode where both exist, else the same path once
    links and ``..`` are resolved."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_writes(outputs: Iterable[tuple[str, str | os.PathLike | None]],
                 inputs: Iterable[tuple[str, str | os.PathLike | None]], overwrite: bool) -> None:
    """Refuse, before any work, a run whose writes would clobber something: ``check_distinct``, then
    ``check_writable`` for each output. ``outputs`` and ``inputs`` are (what, path) pairs; ``what``
    names the path in the message ("-o", "--report", "the input model")."""
    outputs = [(what, p) for what, p in outputs if p is not None]
    check_distinct(outputs, inputs)
    for what, out in outputs:
        check_writable(what, out, overwrite)


def check_distinct(outputs: Iterable[tuple[str, str | os.PathLike | None]],
                   inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """No output is an input (even with --overwrite) or another output (links resolved)."""
    outputs = [(what, Path(p)) for what, p in outputs if p is not None]
    inputs = [(what, Path(p)) for what, p in inputs if p is not None]
    for k, (what, out) in enumerate(outputs):
        for source, path in inputs:
            if path.exists() and same_file(out, path):
                if source == "the input model" and what == "-o":
                    raise OutputExistsError(f"the output {out} is the input model; write the quantized model "
                                            "to another path")
                raise OutputExistsError(f"{what} {out} is {source}; write it to another path")
        for other, path in outputs[:k]:
            if same_file(out, path):
                raise OutputExistsError(f"{what} {out} is also {other}; give each output its own path")


def check_writable(what: str, out: str | os.PathLike, overwrite: bool) -> None:
    """``out`` can be created: it does not exist (or ``overwrite``), is no folder, and its folder exists
    and takes a new file."""
    out = Path(out)
    if out.is_dir():
        raise BadInputError(f"{out} is a directory; give the {what} file path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it, or choose another path")
    if out.parent.exists() and not out.parent.is_dir():
        raise BadInputError(f"{out.parent} is a file, not a folder; give an output path inside a folder")
    if not out.parent.is_dir():
        raise BadInputError(f"the folder {out.parent} does not exist; create it first")
    try:  # the same kind of file atomic_write makes, so that a read-only folder is refused now
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BadInputError(f"cannot write in the folder {out.parent} ({err.strerror}); "
                            "choose a writable output folder") from None


def atomic_write(path: str | os.PathLike, data: bytes, check: Callable[[str], None] | None = None,
                 overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` or leave it untouched: ``check(tmp_path)`` runs on the written temporary
    file before the rename; on any failure the temporary file is removed. The file gets the permissions
    a plain ``open(path, "w")`` would give (mkstemp's are owner-only). Without ``overwrite`` a file that
    appeared at ``path`` meanwhile is kept (``OutputExistsError``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        if check is not None:
            check(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _rename_no_replace(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (a hard link fails on an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} appeared while the run was working; it was kept, and nothing was "
                                "written there: pass --overwrite to replace it, or choose another path") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
            raise
        if path.exists():   # a file system without hard links: check, then rename
            raise OutputExistsError(f"{path} appeared while the run was working; it was kept: pass --overwrite "
                                    "to replace it, or choose another path") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def storage_error(err: OSError, what: str) -> StorageError | None:
    """A one-line ``StorageError`` for an OSError that means no room to write (else None)."""
    if err.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(f"cannot write {what} ({os.strerror(err.errno)}); free some space there or choose "
                        "another folder (TMPDIR for temporary files)")
