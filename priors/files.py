"""Atomic file writes with ordinary permissions: a temporary file in the target folder, then a rename, so that no
reader (a folder listing, another machine syncing the folder) ever sees half a file and a failed write keeps the old
one. The result gets the permissions any new file gets under the process umask, not the temporary's private 0600:
prior files are meant to be shared."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def umask() -> int:
    """The process umask (it can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """`write(tmp)` writes the whole file at `tmp`; it then replaces `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
