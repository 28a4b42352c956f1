"""Compositional hard negatives made from the text itself (NegCLIP / ARO line of work), with
the rules learned from the catalog's own texts, not from a word list.

A caption binds attributes to objects ("a small red mug to the left of a large blue shoe"). A
negative that keeps every word but exchanges two of the same kind ("a small *blue* mug to the
left of a large *red* shoe") is told apart only by a model that binds; one that replaces a word
by another of its kind ("a small *green* mug ...") only by one that reads every attribute.

What is learned (``WordSlots.learn``), from the texts alone:

* **Slots**: words that fill the same place in the catalog's phrases. Each word's contexts
  are the words right before it and right after it. Two words share a slot when both their
  left-context and their right-context distributions are alike (cosine >= ``similarity``):
  colours follow sizes and precede patterns or nouns, nouns follow colours or patterns and
  precede relations. English function words (``STOP_WORDS``: articles, conjunctions,
  pronouns, auxiliaries and the grammatical prepositions; spatial ones such as ``above`` /
  ``below`` are kept, they carry meaning), words in more than ``max_df`` of the texts and rare
  words (fewer than ``min_count`` uses) get no slot: "to the left" / "on the left" share
  contexts but are not a negative of each other. Slots are the connected components.
* **Synonyms**: a pair with several texts (a title and a caption) names the same thing twice.
  When two of its texts each hold exactly one word of a slot and the words differ, the two are
  counted as naming the same thing; two words so aligned at least ``min_synonym`` times and in
  at least ``synonym_share`` of the rarer word's alignments are synonyms
  (``small`` / ``little``, ``mug`` / ``cup``); ``red`` and ``blue`` never align, an item is
  one colour in all its texts.
  Replacing or swapping synonyms would make a paraphrase, not a negative: words of one meaning
  are never exchanged for each other. A catalog with one text per item gives no synonym
  evidence; its slots are then used as they are.

A negative (``negatives``): a swap of two words of one slot and different meanings where the
text has such a pair (bag of words kept), otherwise a replacement of one slot word by a word
of the same slot and another meaning; never the text itself and never another text of the
batch. Torch-free; draws come from a ``random.Random``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .files import write_text_atomic

WORD = re.compile(r"[^\W_][\w'-]*")  # letters and digits of any script, inner ' and -
# closed-class English words: never a slot (a general list of the language, not of any catalog)
STOP_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither
and or but nor so yet if then than as because while
to of on in at by for from with without into onto upon about against via per
i me my we us our you your he him his she her it its they them their
is are was were be been being am do does did has have had will would can could shall should may might must
not very just only also too
""".split())
START, END = "<s>", "</s>"


def words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, lower-cased word) for each word of ``text``."""
    return [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]


def _similarities(vocab: list[str], contexts: dict[str, Counter], max_contexts: int = 4096) -> np.ndarray:
    """Cosine similarities (V, V) of the words' context-count vectors (the ``max_contexts``
    most common context words, the rest pooled into one)."""
    total: Counter = Counter()
    for w in vocab:
        total.update(contexts[w])
    cols = {c: i for i, (c, _) in enumerate(total.most_common(max_contexts))}
    m = np.zeros((len(vocab), len(cols) + 1), np.float64)
    for r, w in enumerate(vocab):
        for c, n in contexts[w].items():
            m[r, cols.get(c, len(cols))] += n
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return m @ m.T


class _Union:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller word names the set: deterministic

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for x in self.parent:
            out[self.find(x)].append(x)
        return sorted(sorted(g) for g in out.values())


@dataclass(frozen=True)
class WordSlots:
    slots: tuple[tuple[str, ...], ...]  # each slot's words, sorted
    meanings: dict[str, str]  # word -> the word naming its meaning (synonyms share one)

    @cached_property  # read for every caption of every step: built once
    def slot_of(self) -> dict[str, int]:
        return {w: i for i, s in enumerate(self.slots) for w in s}

    @classmethod
    def learn(
        cls,
        texts_per_item: Sequence[Sequence[str]],
        min_count: int = 5,
        max_df: float = 0.9,
        similarity: float = 0.5,
        min_synonym: int = 2,
        synonym_share: float = 0.25,
        max_words: int = 2000,
    ) -> WordSlots:
        """Slots and synonyms from a catalog's texts, one sequence of texts per item. At most
        ``max_words`` words (the most used) are given slots: the similarities are a
        (words x words) matrix product."""
        left: dict[str, Counter] = defaultdict(Counter)
        right: dict[str, Counter] = defaultdict(Counter)
        count: Counter = Counter()
        df: Counter = Counter()
        n_texts = 0
        for texts in texts_per_item:
            for text in texts:
                ws = [w for _, _, w in words(text)]
                n_texts += 1
                df.update(set(ws))
                for i, w in enumerate(ws):
                    count[w] += 1
                    left[w][ws[i - 1] if i else START] += 1
                    right[w][ws[i + 1] if i + 1 < len(ws) else END] += 1
        cands = [w for w, c in count.items() if c >= min_count and df[w] <= max_df * n_texts and w not in STOP_WORDS]
        cands = sorted(sorted(cands, key=lambda w: (-count[w], w))[:max_words])  # the most used: a catalog's attribute words
        u = _Union()
        lsim, rsim = _similarities(cands, left), _similarities(cands, right)
        for i, j in zip(*np.nonzero(np.triu((lsim >= similarity) & (rsim >= similarity), k=1))):
            u.join(cands[i], cands[j])
        slots = tuple(tuple(g) for g in u.groups() if len(g) > 1)
        slot_of = {w: i for i, s in enumerate(slots) for w in s}
        # synonyms: one word of a slot in each of two texts of the same item, different words
        aligned: Counter = Counter()  # (a, b) -> alignments of a with b (a < b; a with a too)
        chances: Counter = Counter()  # word -> alignments it took part in
        for texts in texts_per_item:
            per_text = []
            for text in texts:
                by_slot: dict[int, list[str]] = defaultdict(list)
                for _, _, w in words(text):
                    if w in slot_of:
                        by_slot[slot_of[w]].append(w)
                per_text.append(by_slot)
            for i in range(len(per_text)):
                for j in range(i + 1, len(per_text)):
                    for s, ws in per_text[i].items():
                        other = per_text[j].get(s, [])
                        if len(ws) == 1 and len(other) == 1:
                            a, b = sorted((ws[0], other[0]))
                            aligned[a, b] += 1
                            chances[a] += 1
                            chances[b] += a != b
        syn = _Union()
        for w in slot_of:
            syn.find(w)
        for (a, b), c in sorted(aligned.items()):
            if a != b and c >= min_synonym and c >= synonym_share * min(chances[a], chances[b]):
                syn.join(a, b)
        meanings = {w: syn.find(w) for w in slot_of}
        # a slot whose words all mean one thing offers no negative
        slots = tuple(s for s in slots if len({meanings[w] for w in s}) > 1)
        return cls(slots, {w: meanings[w] for s in slots for w in s})

    # ---- negatives ---------------------------------------------------------------------

    def negative(self, text: str, rng: random.Random, avoid: set[str] | frozenset = frozenset(), tries: int = 8) -> str | None:
        """One compositional negative of ``text``: a swap where the text allows one, else a
        replacement; None when the text has no slot word (or every try hit ``avoid``)."""
        found = [(s, e, w) for s, e, w in words(text) if w in self.slot_of]
        if not found:
            return None
        return self._draw(text, found, rng, avoid, tries)

    def _draw(self, text: str, found: list[tuple[int, int, str]], rng: random.Random, avoid, tries: int) -> str | None:
        """A swap of two of the ``found`` slot words of one slot and different meanings where
        there is such a pair, else a replacement of one of them; never ``text`` or in ``avoid``
        (None after ``tries``)."""
        slot_of = self.slot_of
        swaps = [
            (a, b) for i, a in enumerate(found) for b in found[i + 1 :]
            if slot_of[a[2]] == slot_of[b[2]] and self.meanings[a[2]] != self.meanings[b[2]]
        ]
        for _ in range(tries):
            if swaps:
                a, b = rng.choice(swaps)
                out = _substitute(text, {a: b[2], b: a[2]})
            else:
                a = rng.choice(found)
                others = [w for w in self.slots[slot_of[a[2]]] if self.meanings[w] != self.meanings[a[2]]]
                out = _substitute(text, {a: rng.choice(others)})
            if out != text and out not in avoid:
                return out
        return None

    def negatives_of_kinds(self, text: str, k: int, rng: random.Random, avoid: set[str] | frozenset = frozenset(), tries: int = 8) -> list[str]:
        """Up to ``k`` distinct negatives of ``text``, each changing words of another slot (one
        of colour, one of size, one of position ...): per slot a swap of two of its words
        where the text holds such a pair, else a replacement of one. Slots are taken in a
        random order; with fewer slots than ``k`` in the text, fewer negatives."""
        by_slot: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        for f in words(text):
            if f[2] in self.slot_of:
                by_slot[self.slot_of[f[2]]].append(f)
        order = sorted(by_slot)
        rng.shuffle(order)
        out: list[str] = []
        for slot in order:
            if len(out) == k:
                break
            neg = self._draw(text, by_slot[slot], rng, set(avoid) | set(out), tries)
            if neg is not None:
                out.append(neg)
        return out

    def negatives(self, texts: Sequence[str], rng: random.Random) -> list[str | None]:
        """A negative for each text of a batch, none equal to any text of the batch."""
        batch = set(texts)
        return [self.negative(t, rng, batch) for t in texts]

    def negative_lists(self, texts: Sequence[str], rng: random.Random, k: int) -> list[list[str]]:
        """Up to ``k`` negatives for each text of a batch (``negatives`` when k is 1, else
        ``negatives_of_kinds``), none equal to any text of the batch."""
        if k == 1:
            return [[n] if n is not None else [] for n in self.negatives(texts, rng)]
        batch = set(texts)
        return [self.negatives_of_kinds(t, k, rng, batch) for t in texts]

    # ---- what was learned, for people ----------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "slots": [list(s) for s in self.slots],
            "synonyms": sorted(sorted(g) for g in _groups(self.meanings) if len(g) > 1),
        }

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _groups(meanings: dict[str, str]) -> list[list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for w, m in meanings.items():
        out[m].append(w)
    return list(out.values())


def _substitute(text: str, repl: dict[tuple[int, int, str], str]) -> str:
    """``text`` with each (start, end, word) span replaced, keeping a capital first letter."""
    out, at = [], 0
    for (s, e, _), new in sorted(repl.items()):
        old = text[s:e]
        out += [text[at:s], new[:1].upper() + new[1:] if old[:1].isupper() else new]
        at = e
    return "".join(out) + text[at:]
