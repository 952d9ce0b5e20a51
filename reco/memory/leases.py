"""Reader leases: how a writer knows which committed versions open readers still read.

Every open `Memory` keeps a small file `.readers/<pid>-<hex>.json` under the memory holding the
oldest version it may still read (its pid, host, process start time and the time written). A
lease at version v protects every file that a compaction retired at a commit after v: a reader
opens with a lease at version 0 (protecting everything), then reads the manifest, then moves the
lease to the version it read; `refresh()` keeps the old lease while it opens the new version and
moves it afterwards. Leases are removed on `close()` and when the Memory is garbage-collected.

A lease is stale, and ignored, when its process is gone: on this host, when no process of its pid
runs or one started at another time (a reused pid); from another host (a shared file system),
when it was last written more than LEASE_GRACE_S ago. A memory folder a reader cannot write (a
read-only copy) gets no lease; no writer can write there either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
import weakref
from pathlib import Path

from .manifest import READERS_DIR

log = logging.getLogger(__name__)

LEASE_GRACE_S = 24 * 3600.0
_NAME = re.compile(r"(\d+)-[0-9a-f]{16}\.json")


def _start_time(pid: int) -> int | None:
    """The start time of process pid in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: object) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _start_time(pid)
    return start is None or now is None or now == start


def _remove(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # a forked child never removes its parent's lease
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


class Lease:
    """One reader's lease file (created by the first hold())."""

    def __init__(self, root: Path) -> None:
        self.pid = os.getpid()
        self.path: Path | None = root / READERS_DIR / f"{self.pid}-{secrets.token_hex(8)}.json"
        self.version: int | None = None
        self._start = _start_time(self.pid)
        self._finalizer = weakref.finalize(self, _remove, self.path, self.pid)

    def hold(self, version: int) -> None:
        """Writes the lease: this reader may read any version >= version. Not fsynced: after a
        power loss no reader is left to protect."""
        self.version = version
        if self.path is None or os.getpid() != self.pid:
            return
        d = self.path.parent
        record = {
            "pid": self.pid,
            "host": socket.gethostname(),
            "start": self._start,
            "version": version,
            "time": time.time(),
        }
        tmp = d / f".{self.path.name}.tmp-{secrets.token_hex(4)}"
        try:
            if d.is_symlink():
                raise OSError(f"{d} is a symlink")
            d.mkdir(exist_ok=True)
            with open(tmp, "x") as f:
                f.write(json.dumps(record))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only memory: no writer can remove anything either
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            log.debug("no reader lease under %s (%s)", d, e)
            self._finalizer.detach()
            self.path = None

    def release(self) -> None:
        self._finalizer()


def held_versions(root: Path, *, remove_stale: bool = False) -> list[int]:
    """The versions live leases under root hold. A lease that cannot be read counts as holding
    version 0 (everything) until it is older than LEASE_GRACE_S. With remove_stale, stale lease
    files are removed (only files named like leases)."""
    d = root / READERS_DIR
    if d.is_symlink() or not d.is_dir():
        return []
    host, now = socket.gethostname(), time.time()
    versions = []
    for p in d.iterdir():
        m = _NAME.fullmatch(p.name)
        if m is None:
            continue
        try:
            st = p.lstat()
            record = json.loads(p.read_text()) if p.is_file() and st.st_size < 4096 else None
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            record = None
        age = now - st.st_mtime
        if not isinstance(record, dict) or not isinstance(record.get("version"), int):
            stale = age > LEASE_GRACE_S
            version = 0
        elif record.get("host") == host:
            stale = not _alive(int(m.group(1)), record.get("start"))
            version = record["version"]
        else:
            stale = age > LEASE_GRACE_S
            version = record["version"]
        if not stale:
            versions.append(version)
        elif remove_stale:
            p.unlink(missing_ok=True)
    return versions
