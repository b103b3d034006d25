"""Output files as a user expects them: checked before any work, whole or absent, mode from the umask.

- `check_writable(path)` fails at once, with the path the user gave, when the
  folder is missing or read-only (not after minutes of work, naming a temp file);
- `write_atomic(path, data)` writes a temporary file in the same folder, then
  `os.replace`s it into place: a crash leaves the old file or none, never half of one;
- `apply_umask(path)` gives a file written through `tempfile.mkstemp` (always
  0600) the mode the user's umask asks for (0644 under the usual 022).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OptionError


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` resolved; raises `OptionError` if its folder is missing or not writable."""
    path = Path(path)
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise OptionError(f"{what} {path}: folder {path.parent} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{what} {path}: folder {path.parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(f"{what} {path}: the file exists and is not writable")
    return path


def umask_mode() -> int:
    """The mode `open()` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: str | os.PathLike) -> None:
    os.chmod(path, umask_mode())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, with the umask's mode."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["check_writable", "write_atomic", "apply_umask", "umask_mode"]
