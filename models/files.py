"""Image files before decoding: the size cap, the regular-file check and the content hash.

No torch and no Pillow here: commands that read a collection without running the model
(``stats``, ``errors``, ``verify``, ``delete``) import this, not ``preprocess``.
"""

from __future__ import annotations

import hashlib
import os
import stat
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


# what an image may be, decided by its content, never its name: PIL is never asked to try its
# other plugins (EPS / PS / PDF would hand the bytes to Ghostscript where it is installed)
