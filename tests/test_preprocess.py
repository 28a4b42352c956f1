"""Image decoding for the model: JPEGs are decoded at reduced scale when the model needs less."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vtfusion.models.config import VisionConfig
from vtfusion.models.preprocess import ImageError, ImageTransform, load_image


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients, a few hard-edged shapes, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(min(w, h) // 12, min(w, h) // 4)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, size=3)
    arr += rng.normal(0, 4, size=arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _save(img: Image.Image, path, fmt: str = "JPEG", **kw):
    img.save(path, fmt, **kw)
    return path


def test_jpeg_is_decoded_at_reduced_scale_but_never_below_the_side_asked_for(tmp_path):
    jpg = _save(_photo(800, 600), tmp_path / "p.jpg", quality=90)
    assert load_image(jpg).size == (800, 600)
    assert load_image(jpg, draft=64).size == (100, 75)  # 1/8: 600 // 64 = 9 >= 8
    assert load_image(jpg, draft=100).size == (200, 150)  # 1/4: 600 // 100 = 6
    assert load_image(jpg, draft=300).size == (400, 300)  # 1/2
    assert load_image(jpg, draft=301).size == (800, 600)  # 1/2 would give 300 < 301
    png = _save(_photo(800, 600), tmp_path / "p.png", "PNG")
    assert load_image(png, draft=64).size == (800, 600)  # other formats decode in full
    buf = io.BytesIO(jpg.read_bytes())
    assert load_image(buf, draft=64).size == (100, 75)  # in-memory bytes too (ingest reads them so)


def test_the_model_sees_nearly_the_pixels_a_full_decode_gives(tmp_path):
    for mode, w, h in (("letterbox", 1024, 768), ("crop", 768, 1024), ("squash", 900, 900)):
        t = ImageTransform(VisionConfig(image_size=64, resize=mode))
        path = _save(_photo(w, h, seed=w), tmp_path / f"{mode}.jpg", quality=92)
        full = t(load_image(path)).float()
        drafted = t(t.load(path)).float()
        assert t.load(path).size[0] < w  # the draft did apply
        diff = (full - drafted).abs()
        assert float(diff.mean()) < 2.0, (mode, float(diff.mean()))  # of 255
        assert float(diff.max()) < 64, (mode, float(diff.max()))


def test_exif_orientation_survives_the_draft(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(_photo(800, 400), tmp_path / "r.jpg", quality=90, exif=exif)
    assert load_image(path, draft=64).size == (100, 200)  # decoded at 1/4 (200 x 100: 400 // 64 = 6), then turned upright


def test_a_truncated_jpeg_is_an_image_error_with_the_draft_too(tmp_path):
    data = _save(_photo(640, 480), tmp_path / "t.jpg", quality=90).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        ImageTransform(VisionConfig(image_size=64)).load(tmp_path / "cut.jpg")
