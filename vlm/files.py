"""Where vlm keeps its files, and the one way it writes a folder: whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


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
    thing) wins, and ours is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield staging
        if keep_existing and target.exists():
            shutil.rmtree(staging)
        else:
            _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)
