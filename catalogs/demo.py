"""The synthetic demo catalog: product-like renders where cross-attention matters.

Each item shows one object, or two side by side; every object has a category (its shape), a
colour, a pattern and a size, and captions bind those attributes to specific objects and
positions ("a large red striped mug to the left of a small blue plain sneaker"). About half
the two-object items come with an *attribute-swapped twin* (colours, patterns, sizes or
positions exchanged), so both captions hold the same bag of words and only a model that
binds attributes to objects can tell the two images apart. Twins always land in the same
split, so the held-out split is hard too.

The output is the catalog format a user would bring: ``train.csv`` and ``test.csv`` with an
id, an image path relative to the CSV, ``title`` and ``caption`` texts, and metadata columns.
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from vtfusion.models.progress import progress as progress_bar

log = logging.getLogger(__name__)

CATEGORIES: dict[str, list[str]] = {
    "mug": ["mug", "cup"],
    "sneaker": ["sneaker", "shoe"],
    "t-shirt": ["t-shirt", "tee"],
    "lamp": ["lamp", "desk lamp"],
    "bottle": ["bottle", "flask"],
    "hat": ["hat", "cap"],
    "bag": ["bag", "handbag"],
    "chair": ["chair", "stool"],
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 150, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (130, 50, 175),
    "orange": (245, 125, 15),
    "black": (25, 25, 25),
    "pink": (240, 115, 180),
}
# pattern -> (prefix adjectives, postfix phrases) used in captions
PATTERNS: dict[str, tuple[list[str], list[str]]] = {
    "plain": (["plain", "solid"], []),
    "striped": (["striped", "stripy"], ["with stripes"]),
    "dotted": (["dotted", "polka-dot"], ["with dots"]),
    "checkered": (["checkered", "checked"], ["with a check pattern"]),
}
SIZES: dict[str, list[str]] = {"small": ["small", "little"], "large": ["large", "big"]}
BASE_PRICE = {"mug": 8, "sneaker": 60, "t-shirt": 15, "lamp": 35, "bottle": 12, "hat": 18, "bag": 45, "chair": 70}
SWAPS = ("color", "pattern", "size", "position")
FIELDS = ["id", "image", "title", "caption", "category", "color", "pattern", "size", "n_objects", "price", "twin_id"]


@dataclass(frozen=True)
class Obj:
    category: str
    color: str
    pattern: str
    size: str

    def canonical(self) -> str:
        return f"{self.size} {self.color} {self.pattern} {self.category}"


Spec = tuple[Obj, ...]  # one object, or (left, right)


def _random_obj(rng: random.Random, exclude_category: str | None = None) -> Obj:
    cats = [c for c in CATEGORIES if c != exclude_category]
    return Obj(rng.choice(cats), rng.choice(list(COLORS)), rng.choice(list(PATTERNS)), rng.choice(list(SIZES)))


def _twin(spec: Spec, swap: str) -> Spec | None:
    """The spec with one attribute exchanged between the two objects (None if that changes nothing)."""
    a, b = spec
    if swap == "position":
        return (b, a)
    va, vb = getattr(a, swap), getattr(b, swap)
    if va == vb:
        return None
    return (Obj(**{**a.__dict__, swap: vb}), Obj(**{**b.__dict__, swap: va}))


# ---- text ---------------------------------------------------------------------------------


def _phrase(o: Obj, rng: random.Random) -> str:
    size = rng.choice(SIZES[o.size])
    noun = rng.choice(CATEGORIES[o.category])
    prefixes, postfixes = PATTERNS[o.pattern]
    if postfixes and rng.random() < 0.4:
        return f"a {size} {o.color} {noun} {rng.choice(postfixes)}"
    if o.pattern == "plain" and rng.random() < 0.5:
        return f"a {size} {o.color} {noun}"  # "plain" left unsaid: no other pattern is ever implicit
    return f"a {size} {o.color} {rng.choice(prefixes)} {noun}"


# the phrasings of a generalisation split's test captions: never used in training captions
HELD_OUT_SINGLE = ("an image showing {p}", "{p}, seen from the front")
HELD_OUT_PAIR = ("{b}, and to its left {a}", "left: {a}; right: {b}", "{a}, with {b} to its right")


def caption(spec: Spec, rng: random.Random, held_out: bool = False) -> str:
    """A caption binding each object's attributes to it and to its position. ``held_out``: one
    of the phrasings training captions never use (``HELD_OUT_*``)."""
    if len(spec) == 1:
        p = _phrase(spec[0], rng)
        if held_out:
            return rng.choice(HELD_OUT_SINGLE).format(p=p)
        return rng.choice([p, f"a photo of {p}", f"{p}, product shot", f"{p} on a plain background"])
    a, b = _phrase(spec[0], rng), _phrase(spec[1], rng)
    if held_out:
        return rng.choice(HELD_OUT_PAIR).format(a=a, b=b)
    templates = [
        f"{a} to the left of {b}",
        f"{b} to the right of {a}",
        f"{a} on the left and {b} on the right",
        f"on the left {a}, on the right {b}",
        f"{b} on the right and {a} on the left",
    ]
    return rng.choice(templates)


def title(spec: Spec) -> str:
    return " | ".join(o.canonical() for o in spec).capitalize()


# ---- pixels -------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


def _shape_mask(category: str, w: int, h: int) -> Image.Image:
    """A silhouette of the category in a w x h mask (255 inside)."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)

    def P(pts):  # unit coordinates -> pixels
        return [(x * (w - 1), y * (h - 1)) for x, y in pts]

    def R(x0, y0, x1, y1, fill=255):
        d.rectangle(P([(x0, y0), (x1, y1)]), fill=fill)

    def E(x0, y0, x1, y1, fill=255):
        d.ellipse(P([(x0, y0), (x1, y1)]), fill=fill)

    if category == "mug":
        E(0.55, 0.3, 0.97, 0.8)
        E(0.66, 0.42, 0.86, 0.68, fill=0)
        R(0.1, 0.15, 0.72, 0.95)
    elif category == "sneaker":
        d.polygon(P([(0.03, 0.5), (0.4, 0.5), (0.55, 0.25), (0.8, 0.25), (0.97, 0.65), (0.97, 0.85), (0.03, 0.85)]), fill=255)
    elif category == "t-shirt":
        d.polygon(
            P([(0.3, 0.08), (0.42, 0.16), (0.58, 0.16), (0.7, 0.08), (0.97, 0.3), (0.84, 0.47), (0.76, 0.4),
               (0.76, 0.95), (0.24, 0.95), (0.24, 0.4), (0.16, 0.47), (0.03, 0.3)]),
            fill=255,
        )
    elif category == "lamp":
        d.polygon(P([(0.3, 0.05), (0.7, 0.05), (0.9, 0.45), (0.1, 0.45)]), fill=255)
        R(0.45, 0.45, 0.55, 0.85)
        R(0.25, 0.85, 0.75, 0.97)
    elif category == "bottle":
        R(0.38, 0.03, 0.62, 0.3)
        d.rounded_rectangle(P([(0.2, 0.25), (0.8, 0.97)]), radius=max(1, w // 6), fill=255)
    elif category == "hat":
        d.pieslice(P([(0.2, 0.15), (0.8, 0.95)]), 180, 360, fill=255)
        E(0.02, 0.45, 0.98, 0.75)
    elif category == "bag":
        E(0.25, 0.05, 0.75, 0.6)
        E(0.35, 0.15, 0.65, 0.5, fill=0)
        R(0.08, 0.35, 0.92, 0.97)
    elif category == "chair":
        R(0.15, 0.03, 0.3, 0.6)
        R(0.15, 0.5, 0.85, 0.62)
        R(0.15, 0.62, 0.25, 0.97)
        R(0.75, 0.62, 0.85, 0.97)
    else:
        raise ValueError(f"unknown category {category!r}")
    return m


def _texture(o: Obj, w: int, h: int, rng: random.Random) -> Image.Image:
    color = COLORS[o.color]
    light = tuple(int(c + (255 - c) * 0.8) for c in color)
    tex = Image.new("RGB", (w, h), color)
    d = ImageDraw.Draw(tex)
    period = max(4, round(min(w, h) / rng.uniform(3.5, 4.5)))
    half = max(2, period // 2)
    if o.pattern == "striped":
        for x in range(-h, w + h, period):  # diagonal stripes
            d.polygon([(x, 0), (x + half, 0), (x + half + h, h), (x + h, h)], fill=light)
    elif o.pattern == "dotted":
        r = max(1, period // 4)
        for y in range(period // 2, h, period):
            for x in range(period // 2, w, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=light)
    elif o.pattern == "checkered":
        for y in range(0, h, half):
            for x in range(0, w, half):
                if (x // half + y // half) % 2:
                    d.rectangle([x, y, x + half - 1, y + half - 1], fill=light)
    return tex


def render(spec: Spec, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(228, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    centers = [0.5] if len(spec) == 1 else [rng.uniform(0.22, 0.32), rng.uniform(0.68, 0.78)]
    scale = {"small": 0.36, "large": 0.6} if len(spec) == 1 else {"small": 0.24, "large": 0.4}
    for o, cx in zip(spec, centers):
        side = max(8, round(size * scale[o.size] * rng.uniform(0.92, 1.08)))
        x0 = round(cx * size - side / 2)
        y0 = round(size * rng.uniform(0.45, 0.55) - side / 2)
        mask = _shape_mask(o.category, side, side)
        img.paste(_texture(o, side, side, rng), (x0, y0), mask)
        # a dark outline keeps light patterns readable against the light background
        edge = mask.filter(ImageFilter.FIND_EDGES)
        img.paste((40, 40, 40), (x0, y0), edge)
    return img


# ---- catalog ------------------------------------------------------------------------------


def generate_specs(n: int, rng: random.Random, pair_frac: float = 0.7, twin_frac: float = 0.5) -> list[tuple[Spec, int]]:
    """n unique specs, each with its group number (twins share a group)."""
    used: set[Spec] = set()
    out: list[tuple[Spec, int]] = []
    group = 0
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"cannot draw {n} distinct items from the attribute space")
        if rng.random() < pair_frac:
            a = _random_obj(rng)
            spec: Spec = (a, _random_obj(rng, exclude_category=a.category))
        else:
            spec = (_random_obj(rng),)
        if spec in used:
            continue
        members = [spec]
        if len(spec) == 2 and len(out) + 1 < n and rng.random() < twin_frac:
            swaps = list(SWAPS)
            rng.shuffle(swaps)
            for swap in swaps:
                twin = _twin(spec, swap)
                if twin is not None and twin not in used and twin != spec:
                    members.append(twin)
                    break
        for m in members:
            used.add(m)
            out.append((m, group))
        group += 1
    return out


def held_out_combos(seed: int, share: float) -> set[tuple[str, str]]:
    """``share`` of the (colour, category) combinations, drawn for the seed: a generalisation
    split keeps every item showing one of them out of training."""
    combos = sorted((c, k) for c in COLORS for k in CATEGORIES)
    return set(random.Random(f"{seed}-held-out-combos").sample(combos, round(share * len(combos))))


def generate(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    image_size: int = 128,
    test_frac: float = 0.2,
    train_twins: bool = True,
    test_twins_only: bool = False,
    held_out_phrasings: bool = False,
    held_out_combo_share: float = 0.0,
) -> dict:
    """Write ``images/*.png``, ``train.csv`` and ``test.csv`` under ``out_dir``; return counts.

    A generalisation split (any of the last four options; the defaults give today's catalog
    byte for byte): ``train_twins=False`` keeps one item of each training twin pair, so
    training never sees attribute-swapped twins; ``test_twins_only`` keeps only twin pairs in
    the test split, so every test item has a twin; ``held_out_phrasings`` writes the test
    captions with phrasings training never uses; ``held_out_combo_share`` of the (colour,
    category) combinations appear in the test split only. ``n`` items are drawn before those
    filters; ``split.json`` records the options and the held-out combinations."""
    if n < 2:
        raise ValueError("--n must be at least 2 (one train and one test item)")
    if not 0 <= held_out_combo_share < 1:
        raise ValueError(f"--held-out-combos must be in [0, 1); got {held_out_combo_share}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = generate_specs(n, rng)
    groups = sorted({g for _, g in specs})
    test_groups = {g for g in groups if rng.random() < test_frac}
    if not test_groups or len(test_groups) == len(groups):  # both splits non-empty
        test_groups = set(groups[-max(1, len(groups) // 5):])
    options = {"train_twins": train_twins, "test_twins_only": test_twins_only, "held_out_phrasings": held_out_phrasings,
               "held_out_combo_share": held_out_combo_share}
    special = options != {"train_twins": True, "test_twins_only": False, "held_out_phrasings": False, "held_out_combo_share": 0.0}
    combos = held_out_combos(seed, held_out_combo_share) if held_out_combo_share else set()
    if special:
        members: dict[int, list[Spec]] = {}
        for spec, g in specs:
            members.setdefault(g, []).append(spec)
        test_groups |= {g for g, ms in members.items() if any((o.color, o.category) in combos for m in ms for o in m)}
        keep = []
        for spec, g in specs:
            size = len(members[g])
            if g in test_groups and test_twins_only and size < 2:
                continue  # every test item has a twin
            if g not in test_groups and not train_twins and spec != members[g][0]:
                continue  # one item of each training twin pair
            keep.append((spec, g))
        specs = keep
        if not any(g in test_groups for _, g in specs) or all(g in test_groups for _, g in specs):
            raise ValueError("these options leave the train or the test split empty; raise --n")
    by_group: dict[int, list[str]] = {}
    rows = {"train": [], "test": []}
    for i, (spec, g) in enumerate(progress_bar(specs, desc="render", unit="img")):
        item_id = f"p{i:06d}"
        by_group.setdefault(g, []).append(item_id)
        rel = f"images/{item_id}.png"
        render(spec, image_size, rng).save(out / rel, optimize=False)
        main = spec[0]
        price = BASE_PRICE[main.category] * (1.5 if main.size == "large" else 1.0) * rng.uniform(0.8, 1.25)
        if len(spec) == 2:
            price += BASE_PRICE[spec[1].category] * 0.5
        rows["test" if g in test_groups else "train"].append(
            {
                "id": item_id,
                "image": rel,
                "title": title(spec),
                "caption": caption(spec, rng, held_out=held_out_phrasings and g in test_groups),
                "category": main.category,
                "color": main.color,
                "pattern": main.pattern,
                "size": main.size,
                "n_objects": len(spec),
                "price": f"{price:.2f}",
                "_group": g,
            }
        )
    twins = 0
    for split, split_rows in rows.items():
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for r in split_rows:
                mates = [m for m in by_group[r.pop("_group")] if m != r["id"]]
                twins += bool(mates)
                w.writerow({**r, "twin_id": mates[0] if mates else ""})
    counts = {"items": len(specs), "train": len(rows["train"]), "test": len(rows["test"]), "items_with_twin": twins}
    if special:
        import json

        counts["held_out_combos"] = sorted(f"{c} {k}" for c, k in combos)
        (out / "split.json").write_text(json.dumps({**options, "seed": seed, "n_drawn": n, **counts}, indent=2) + "\n")
    log.info("demo catalog in %s: %s", out, counts)
    return counts
