"""Writes that are complete or absent: a crash or a bad input never leaves a half-written output.

Files are written beside their destination and renamed into place (rename is atomic on POSIX within
one file system). Directories are built in a staging directory next to the destination, then swapped in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from odyssey.errors import OdysseyError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temp file + fsync + rename)."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (by any means: np.lib.format.open_memmap, ...); on
    normal exit it is fsynced and renamed to `path`, on error removed. Readers see the old file or the
    whole new one, and two writers of the same bytes may race."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit it becomes `dest`, on error it disappears.

    An existing non-empty `dest` is refused unless overwrite=True; then it is replaced only once the
    new content is complete, so an interrupted or failed write keeps the old one.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise OdysseyError(f"{dest} already exists and is not empty; choose another path or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.with_name(f".{dest.name}.staging-{uuid.uuid4().hex[:8]}")
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(stage, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
