"""One writer per `out_dir`: a lock file naming its holder (host, pid, process start), taken over when stale.

`OutDirLock(out_dir).acquire()` creates `out_dir/.lock` exclusively (O_EXCL). A second live writer gets
`OutDirLockedError` at once, before any work. A lock left by a killed process on this host (its pid is gone, or now
belongs to a process started at another time) is taken over with a warning; a lock from another host is never
guessed stale: the message says how to remove it.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path


_HELD: dict[str, int] = {}  # lock paths this process holds -> nesting depth (a writer may call write_result)


class OutDirLockedError(RuntimeError):
    """Another live process is writing into the same out_dir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), so a reused pid is not mistaken for the lock's holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start is not None and _process_start(pid) not in (None, start):
        return False  # the pid was reused by another process
    return True


class OutDirLock:
    """Exclusive writer lock on a directory (a context manager)."""

    def __init__(self, directory: str | os.PathLike, what: str = "out_dir"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / ".lock"
        self.held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "time": time.time()}

    def _try_create(self) -> bool:
        """Create the lock with its content in one step: a hard link of a finished temporary file fails if the lock
        exists (atomic on POSIX filesystems, NFS included), so no one ever reads a lock file half written."""
        tmp = self.path.with_name(f".lock.new{os.getpid()}")
        tmp.write_text(json.dumps(self._record()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> "OutDirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if _HELD.get(key):  # this process already holds it (re-entrant)
            _HELD[key] += 1
            self.held = True
            return self
        for _ in range(50):
            if self._try_create():
                self.held = True
                _HELD[key] = 1
                return self
            try:
                holder = json.loads(self.path.read_text())
            except FileNotFoundError:
                continue  # released between our two looks: try again
            except (OSError, ValueError):
                holder = {}  # not written by this class (or damaged): stale once nobody has touched it for a while
            host, pid = holder.get("host"), holder.get("pid")
            if not holder and not self._old(self.path):
                time.sleep(0.1)
                continue
            if holder and host != socket.gethostname():
                raise OutDirLockedError(
                    f"{self.what}={str(self.directory)!r} is being written by process {pid} on host {host!r} "
                    f"(lock file {self.path}). Wait for it to finish or use another {self.what}; if that process is "
                    f"gone, delete {self.path}."
                )
            if holder and isinstance(pid, int) and _alive(pid, holder.get("start")):
                raise OutDirLockedError(
                    f"{self.what}={str(self.directory)!r} is being written by another live process (pid {pid} on "
                    f"this host, lock file {self.path}): one writer per {self.what} at a time. Wait for it to finish "
                    f"or use another {self.what}."
                )
            self._take_over(holder)
        raise OutDirLockedError(f"could not take the lock {self.path}: other processes keep taking it")

    @staticmethod
    def _old(path: Path, seconds: float = 10.0) -> bool:
        try:
            return time.time() - path.stat().st_mtime > seconds
        except FileNotFoundError:
            return True

    def _take_over(self, stale: dict) -> None:
        """Remove the stale lock `stale`, unless someone replaced it meanwhile (one taker at a time)."""
        guard = self.path.with_name(".lock.takeover")
        if guard.exists() and self._old(guard, 60):
            guard.unlink(missing_ok=True)  # a taker that died while taking over
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            try:
                current = json.loads(self.path.read_text())
            except FileNotFoundError:
                return
            except (OSError, ValueError):
                current = {}
            if current == stale:
                warnings.warn(f"taking over the stale lock {self.path} of process {stale.get('pid')} (no longer "
                              "running): an earlier run was killed; this one resumes from its finished shards",
                              RuntimeWarning, stacklevel=3)
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.path.resolve())
        _HELD[key] = _HELD.get(key, 1) - 1
        if _HELD[key] <= 0:
            del _HELD[key]
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
