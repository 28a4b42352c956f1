"""Preprocessing that stays outside ``nn.Module``: image loading/transform and tokenisation.

Images travel as uint8 (B, 3, S, S) until they reach the model's device, where
``normalize_pixels`` turns them into floats: four times less memory in caches, DataLoader
queues and host-to-device copies than float pixels.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Sequence
from typing import IO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import VisionConfig
# the checks before decoding need no torch (commands that only read a collection start fast);
# re-exported here, where the rest of the image path lives
from .files import MAX_IMAGE_BYTES, ImageError, image_hash, read_image_bytes  # noqa: F401

DEFAULT_MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # (a multi-picture JPEG opens as JPEG, format "MPO")


def load_image(
    path: str | os.PathLike | IO[bytes] | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    draft: int | None = None,
) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to RGB; raise ImageError on failure.

    ``name`` is what error messages call the image (defaults to ``path``; pass the file name
    when ``path`` is an in-memory buffer). ``draft``: the side of the square the image will be
    resized to; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as
    long as both sides stay at least ``draft``, which skips most of the decoding work for
    product photos many times the model's input size. Other formats decode in full.
    """
    if name is None:
        name = str(path)
    owned = not isinstance(path, Image.Image)  # opened here: transposed and converted in place, no copies
    if not owned:
        img = path
        if img.format is not None and img.format not in (*IMAGE_FORMATS, "MPO"):
            raise ImageError(f"not an image in an allowed format (JPEG, PNG, WebP, GIF, BMP, TIFF) ({img.format}): {name}")
    else:
        try:
            img = Image.open(path, formats=IMAGE_FORMATS)
        except FileNotFoundError as e:
            raise ImageError(f"file not found: {name}") from e
        except Image.DecompressionBombError as e:
            raise ImageError(f"decompression bomb refused: {name} ({e})") from e
        except (OSError, Image.UnidentifiedImageError) as e:
            raise ImageError(f"not an image in an allowed format (JPEG, PNG, WebP, GIF, BMP, TIFF): {name}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the cap of {max_pixels}: {name}")
    try:
        if owned and draft:
            img.draft(None, (draft, draft))  # a no-op but for JPEG
        img.load()
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey: keep the high byte, not a clipped low one
            arr = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray((arr >> 8 if img.mode.startswith("I;16") or arr.max() > 255 else arr).clip(0, 255).astype(np.uint8))
        return img if owned and img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"corrupt or truncated image: {name} ({e})") from e


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def letterbox(img: Image.Image, size: int, resample: str = "bilinear") -> Image.Image:
    """Scale the longer side to ``size`` and pad to a white square, centred (what the model sees)."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), RESAMPLE[resample], reducing_gap=3.0)
    if (nw, nh) != (size, size):
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return img


def fit(img: Image.Image, size: int, mode: str = "letterbox", resample: str = "bilinear") -> Image.Image:
    """``img`` as a ``size`` square: ``letterbox`` (pad, native models), ``squash`` (resize both
    sides, as BLIP's processor does) or ``crop`` (shorter side to ``size``, centre crop, as CLIP's)."""
    if mode == "letterbox":
        return letterbox(img, size, resample)
    if mode == "squash":
        return img.resize((size, size), RESAMPLE[resample])
    if mode == "crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), RESAMPLE[resample])
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"unknown resize mode {mode!r}; expected letterbox, squash or crop")


class ImageTransform:
    """PIL image -> uint8 (3, S, S), resized as the config says (see :func:`fit`).

    Native models letterbox rather than centre-crop: it keeps every object in frame (product
    shots often place items near the edges); padding is white, the usual catalog background.
    Pretrained towers get the resize they were trained with (BLIP squashes, CLIP crops).
    """

    def __init__(self, cfg: VisionConfig):
        self.size = cfg.image_size
        self.mode, self.resample = cfg.resize, cfg.resample
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    def load(
        self, path: str | os.PathLike | IO[bytes] | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
    ) -> Image.Image:
        """:func:`load_image` for this transform: a JPEG is decoded no larger than it needs to be
        for a ``size`` square. Every path from an image file to the model goes through here
        (training, ingest, query by file, re-encoding on a token-cache miss), so each sees the
        same pixels."""
        return load_image(path, max_pixels, name, draft=self.size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(fit(img, self.size, self.mode, self.resample), dtype=np.uint8)  # (S, S, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, S, S)

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        return torch.stack([self(img) for img in images])  # (B, 3, S, S) uint8

    def normalize(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) on any device -> normalised float32 (B, 3, S, S)."""
        x = pixels_u8.float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class TextTokenizer:
    """Texts -> (ids, mask) LongTensors (B, L), padded to the longest, truncated to max_length."""

    def __init__(self, hf_tokenizer, max_length: int):
        self.hf = hf_tokenizer
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.hf(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))

    @classmethod
    def load(cls, folder: str | Path, max_length: int) -> TextTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), max_length)


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, max_length: int = 32) -> TextTokenizer:
    """A lower-cased BERT-style WordPiece tokenizer whose vocabulary is learned from the catalog.

    Vocabulary: the special tokens, every character seen plus ASCII letters, digits and punctuation (as a word start and as a ``##``
    continuation, so no word is ever [UNK]), then whole words by frequency (ties
    alphabetical) up to ``vocab_size``. Built with ``tokenizers``' WordPiece model, BERT
    normaliser and pre-tokeniser, but not its trainer: that trainer's output changes from run
    to run (hash-map ordering), which would break seeded reproducibility.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    room = max(0, vocab_size - len(vocab))
    seen = set(vocab)
    vocab += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in seen][:room]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    return TextTokenizer(hf, max_length)
