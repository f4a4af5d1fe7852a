"""What touches the disk: files written whole or not at all, and the paths a command needs, checked
before the slow part.

A file is written to a temporary name beside it, reaches the disk, and only then is renamed over the
old one, so no kill, crash or power cut leaves it half-written under its real name. A run resumed after
a kill rewrites what describes its out dir, so every such file is written this way (`write_with`)."""

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch.utils._pytree import tree_leaves

from lit_llama.errors import BadPath, MissingFile


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


def write_with(path: Path, write: Callable[[Path], object]) -> None:
    """`path` holds what `write(tmp)` wrote to a temporary file beside it, or (killed before the end)
    what it held before: every file of this project is written through here."""
    tmp = temporary_name(path)
    write(tmp)
    replace_durably(tmp, path)


def write_atomic(path: Path, data: Union[str, bytes]) -> None:
    """`path` holds `data` afterwards, or (killed before the end) what it held before."""
    if isinstance(data, str):
        write_with(path, lambda tmp: tmp.write_text(data, encoding="utf-8"))
    else:
        write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, written atomically. Tensors must be on the CPU: a file of GPU tensors names that GPU,
    and loads where it is."""
    away = [t.device for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.device != torch.device("cpu")]
    if away:
        raise ValueError(f"{path}: tensors on {away[0]} given to save; move them to the CPU first")
    write_with(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj: Any, path: Path) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_writable(directory: Path, need_bytes: int, flag: str = "--out_dir") -> None:
    """Fail now, not hours from now, when `directory` (given as `flag`) can't be written or lacks the room
    for checkpoints."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise BadPath(f"{flag} {directory} is not writable ({e.strerror or e}); pick another directory") from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise BadPath(f"{flag} {directory} has {free / 2**30:.2f} GiB free but checkpoints need about "
                      f"{need_bytes / 2**30:.2f} GiB; free some space or pick another directory")


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a file; else one line that names it and says `what` to do."""
    if not Path(path).is_file():
        raise MissingFile(f"{path} not found: {what}")
    return Path(path)


def require_dir(path: Path, flag: str, what: str) -> Path:
    """`path`, given as `flag`, if it is a directory; else one line that names both and says `what` to do."""
    path = Path(path)
    if path.is_file():
        raise BadPath(f"{flag} {path} is a file, not a directory: {what}")
    if not path.is_dir():
        raise MissingFile(f"{flag} {path} not found: {what}")
    return path
