"""Where vlm keeps its files, and the one way it writes a folder: whole or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# The disk, not the program, refused the write: the user can do something about these.
DISK_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class WriteError(OSError):
    """A folder could not be written because the disk refused it (full, read-only, no permission)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def cache_dir() -> Path:
    """The user cache: dequantised packaged LMs and frozen-encoder features (`VLM_CACHE` moves it)."""
    root = os.environ.get("VLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlm"
    return Path(root)


@contextmanager
def atomic_dir(target: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `target`; when the block ends it becomes `target` in one rename.

    Readers see the old folder or the new one, never half of either. If the block fails (a full
    disk, a kill signal turned into an exception), the staging folder is removed, so nothing is left
    behind. `keep_existing`: a `target` that appeared meanwhile (another process wrote the same
    thing) wins, and ours is dropped. A disk that refuses the folder raises WriteError naming it.
    """
    target = Path(target)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        yield staging
        if keep_existing and target.exists():
            shutil.rmtree(staging)
        else:
            _swap_into_place(staging, target)
    except BaseException as e:
        fault = _write_error(e, target)  # before the staging folder goes, while a full disk is still full
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if fault is not None:
            raise fault from e
        raise


def _write_error(error: BaseException, target: Path) -> WriteError | None:
    """WriteError when the disk refused the write. torch.save and safetensors report a full disk as
    errors of their own (RuntimeError, SafetensorError) that need not carry the OSError, so a write
    that failed on a disk with no space left counts as a full disk too."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in DISK_FAULTS:
            return WriteError(cause.errno, cause.strerror, str(target))
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, Exception) and target.parent.is_dir() and shutil.disk_usage(target.parent).free == 0:
        return WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return None


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)
