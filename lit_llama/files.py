"""Writing a file so that no kill, crash or power cut leaves it half-written under its real name: the
bytes go to a temporary file beside it, reach the disk, and only then is it renamed over the old one.
A run resumed after a kill rewrites what describes its out dir, so every such file is written this way."""

import os
from pathlib import Path
from typing import Union


def temporary_name(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the complete file `tmp` over `path`. A killed process needs only the rename (what it wrote
    is in the page cache, and the kernel writes it out); a power cut also needs the bytes flushed before
    the rename, or the disk may get the new name before the new bytes, and the directory entry after it."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:  # a directory can't be opened on some systems (Windows): the rename is all there is
        return
    try:
        os.fsync(fd)
    except OSError:  # nor synced on some file systems
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    """`path` holds `data` afterwards, or (killed before the end) what it held before."""
    tmp = temporary_name(path)
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    replace_durably(tmp, path)
