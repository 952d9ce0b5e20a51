"""Files, safely: reading those whose names come from untrusted places (a manifest, a caption
table, a user's flag: only regular files, never past a known size or a limit, never outside a
given folder), and writing any file atomically (`atomic_write`): the project's one way to do it."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

_FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def flat(e: BaseException) -> str:
    """An exception's message on one line (tarfile's and Arrow's may span several)."""
    return " ".join(str(e).split())


def as_path(path: object, what: str = "path") -> Path:
    """A str, bytes or os.PathLike argument as a Path; anything else is a TypeError."""
    if isinstance(path, (str, bytes, os.PathLike)):
        p = os.fsdecode(path)
        if p and "\0" not in p:
            return Path(p)
        raise ValueError(f"{what} must be a non-empty path without NUL bytes, got {path!r}")
    raise TypeError(f"{what} must be a path (str, bytes or os.PathLike), got {type(path).__name__}")


def not_regular(what: str, path: Path, mode: int, error: type[Exception] = ValueError) -> Exception:
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
    return error(f"{what} {path}: not a regular file ({kind})")


def stat_regular(path: Path, what: str, error: type[Exception] = ValueError) -> os.stat_result:
    """path's stat if it is a regular file; FIFOs, devices and folders are refused unopened
    (opening a FIFO blocks, and a device may never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise error(f"{what} {path}: cannot be read ({flat(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(what, path, st.st_mode, error)
    return st


def open_regular(
    path: Path,
    what: str,
    *,
    size: int | None = None,
    limit: int | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """A read-only descriptor of path if it is a regular file of exactly size bytes (when given)
    and at most limit bytes. Opened non-blocking and checked after opening, so a FIFO or device
    is refused without a hang."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise error(f"{what} {path}: cannot be read ({flat(e)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(what, path, st.st_mode, error)
        if size is not None and st.st_size != size:
            raise error(
                f"{what} {path}: {st.st_size} bytes, the manifest says {size} "
                "(truncated or replaced)"
            )
        if limit is not None and st.st_size > limit:
            raise error(f"{what} {path}: {st.st_size} bytes, over the limit of {limit}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_blocks(
    fd: int, size: int, what: str = "a file", error: type[Exception] = ValueError
) -> Iterator[bytes]:
    """Exactly size bytes of fd in blocks (a file that changes size while read is an error)."""
    left = size
    while left:
        block = os.read(fd, min(left, 1 << 24))
        if not block:
            raise error(f"{what} shrank while it was read ({left} bytes short)")
        left -= len(block)
        yield block
    if os.read(fd, 1):
        raise error(f"{what} grew while it was read")


def read_regular(
    path: Path,
    what: str,
    *,
    size: int | None = None,
    limit: int | None = None,
    error: type[Exception] = ValueError,
) -> bytes:
    """The bytes of a regular file (of size bytes, or at most limit bytes), never reading past
    either."""
    fd = open_regular(path, what, size=size, limit=limit, error=error)
    try:
        n = os.fstat(fd).st_size
        return b"".join(read_blocks(fd, n, f"{what} {path}", error))
    finally:
        os.close(fd)


def inside(
    root: Path, path: Path, what: str, error: type[Exception] = ValueError, folder: str = "folder"
) -> Path:
    """path with symlinks resolved, if it lies inside root (resolved); else an error naming
    what."""
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise error(f"{what} resolves to {real}, outside the {folder} {top}")
    return real


def fsync_dir(path: Path) -> None:
    """Makes the renames and creations in folder `path` survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Writes `path` all at once or not at all: write(f) fills a temporary file in the same folder
    (a dot name with a random suffix, never taken for the real file), which is fsynced, renamed
    over `path`, and the folder fsynced. A crash or an exception leaves the old file (or none),
    and the temporary file is removed on an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
