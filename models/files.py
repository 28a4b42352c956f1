"""Files without torch: image files before decoding (the size cap, the regular-file check and
the content hash), and the one way small files (configs, JSON sidecars) are replaced.

No torch and no Pillow here: commands that read a collection without running the model
(``stats``, ``errors``, ``verify``, ``delete``) import this, not ``preprocess``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path


class ImageError(ValueError):
    """An image file that cannot be used: missing, not an image, truncated, or too large."""


MAX_IMAGE_BYTES = 50 * 1024 * 1024  # an image file larger than this is refused before it is read


def read_image_bytes(path: str | os.PathLike, cap: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image file: a regular file (never a device, FIFO or folder: /dev/zero
    would never end, a FIFO would block) of at most ``cap`` bytes, read no further than that
    whatever its size claims. ImageError otherwise."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # what was opened, not what the name pointed to a moment before
                raise ImageError(f"not a regular file: {p}")
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {p}") from None
    except OSError as e:
        raise ImageError(f"image file unreadable: {p} ({e.strerror or e})") from None
    if len(data) > cap:
        raise ImageError(f"image file is over the cap of {cap} bytes: {p}")
    return data


def image_hash(image_bytes: bytes) -> str:
    """sha256 of the image bytes alone: how an image is recognised whatever it is called, and
    whatever text and metadata it was ingested with (``items.image_hash``, evaluation pairs)."""
    return hashlib.sha256(image_bytes).hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` so that a reader, or a crash, sees the old file or the new
    one and never part of one: a temp file beside it (unique per process and thread), fsync'ed,
    then renamed over it. The old file's permission bits are kept."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    perms = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, perms)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
