"""An exclusive lock on a file, across processes (``flock``; on systems without it, a no-op:
the callers' in-process locks still serialise threads)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


@contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextmanager
def try_file_lock(path: str | Path):
    """Like ``file_lock`` without waiting: yields True holding the lock, or False when another
    process holds it."""
    with open(path, "a+") as f:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
