"""Pairs files for evaluation: read (CSV, Karpathy JSON, BLIP/ALBEF annotation JSON) and
grouped by image bytes, every row accounted for (usable, or skipped with its line and reason)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from vtfusion.models.preprocess import ImageError, image_hash, read_image_bytes

@dataclass(frozen=True)
class EvalPair:
    image: Path | None  # None: the row names no image
    caption: str
    line: int


JSON_FORMATS = (
    "Karpathy JSON ({\"images\": [{\"filename\", \"filepath\", \"split\", \"sentences\": [{\"raw\"}]}]}, "
    "as dataset_coco.json / dataset_flickr30k.json) or BLIP/ALBEF annotation JSON ([{\"image\": path, "
    "\"caption\": text or [texts]}])"
)


def read_pairs(path: str | Path, image_col: str = "image", text_col: str = "caption", split: str = "test") -> list[EvalPair]:
    """Every (image, caption) row of a CSV (image path relative to the CSV), a Karpathy JSON
    (``images[].sentences``, ``split`` chosen) or a BLIP/ALBEF annotation JSON (``[{"image",
    "caption"}]``, a caption a string or a list), in file order, empty ones included (the
    evaluation lists them as skipped). ValueError naming the expected formats for any other
    JSON, or a CSV without the columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e}); expected {JSON_FORMATS}") from None
        images = data.get("images") if isinstance(data, dict) else data
        if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
            raise ValueError(f"{path}: expected {JSON_FORMATS}")
        if images and all("image" in im and "caption" in im for im in images):  # BLIP / ALBEF / LAVIS annotations
            out = []
            for n, im in enumerate(images, 1):
                caps = im["caption"] if isinstance(im["caption"], list) else [im["caption"]]
                out += [EvalPair(path.parent / str(im["image"]), str(c).strip(), n) for c in caps]
            return out
        if not all("filename" in im for im in images):
            raise ValueError(f"{path}: entries without 'filename' (or 'image' and 'caption'); expected {JSON_FORMATS}")
        if any("split" in im for im in images):
            images = [im for im in images if im.get("split") == split]
        out = []
        for n, im in enumerate(images, 1):
            img = path.parent / str(im.get("filepath", "")) / str(im["filename"])
            out += [EvalPair(img, str(s.get("raw", "")).strip(), n) for s in im.get("sentences", []) if isinstance(s, dict)]
        return out
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            missing = [c for c in (image_col, text_col) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: columns {missing} not in the header {reader.fieldnames}")
            return [
                EvalPair(path.parent / r[image_col] if (r.get(image_col) or "").strip() else None,
                         (r.get(text_col) or "").strip(), reader.line_num)
                for r in reader
            ]
        except (csv.Error, UnicodeDecodeError) as e:  # a NUL byte, a field over the size limit, not UTF-8
            raise ValueError(f"{path}: not a readable CSV near line {reader.line_num + 1} ({e})") from None


@dataclass
class PairSet:
    """The rows of a pairs file that can be evaluated, their images grouped by bytes."""

    pairs: list[EvalPair]  # every row read (query ids ``r<j>`` index this list)
    rows: list[int]  # the usable rows, indices into ``pairs``, in file order
    row_group: dict[int, int]  # usable row -> its image group
    groups: list[tuple[str, Path]]  # per image group: (sha256 of the bytes, a file holding them)
    skipped: list[dict]  # {"row", "line", "image", "caption", "reason"} per row left out

    def skip(self, groups: dict[int, str]) -> None:
        """Move the rows of these image groups (group -> reason) to ``skipped``."""
        for j in [j for j in self.rows if self.row_group[j] in groups]:
            self.skipped.append(_skipped(self.pairs[j], j, groups[self.row_group[j]]))
        self.rows = [j for j in self.rows if self.row_group[j] not in groups]

    def group_rows(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for j in self.rows:
            out.setdefault(self.row_group[j], []).append(j)
        return out


def _skipped(p: EvalPair, j: int, reason: str) -> dict:
    return {"row": j, "line": p.line, "image": str(p.image or ""), "caption": p.caption, "reason": reason}


def load_pairs(pairs: list[EvalPair]) -> PairSet:
    """Read each distinct image file once and group the rows by its bytes; rows without a
    caption or a readable image file are skipped with the reason."""
    by_path: dict[Path, tuple[str | None, str]] = {}
    group_of: dict[str, int] = {}
    out = PairSet(pairs, [], {}, [], [])
    for j, p in enumerate(pairs):
        if not p.caption:
            out.skipped.append(_skipped(p, j, "empty caption"))
            continue
        if p.image is None:
            out.skipped.append(_skipped(p, j, "no image"))
            continue
        path = p.image.resolve()
        if path not in by_path:
            by_path[path] = _hash_file(path)
        h, why = by_path[path]
        if h is None:
            out.skipped.append(_skipped(p, j, why))
            continue
        if h not in group_of:
            group_of[h] = len(out.groups)
            out.groups.append((h, path))
        out.rows.append(j)
        out.row_group[j] = group_of[h]
    return out


def _hash_file(path: Path) -> tuple[str | None, str]:
    try:
        data = read_image_bytes(path)
        return image_hash(data), ""
    except ImageError as e:
        return None, str(e)
    except FileNotFoundError:
        return None, f"image file not found: {path}"
    except OSError as e:
        return None, f"image file unreadable: {e}"
