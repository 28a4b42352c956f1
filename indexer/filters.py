"""Filter expressions over item metadata, parsed into SQLAlchemy expressions (never raw SQL).

Grammar (keywords case-insensitive)::

    expr  := and ('OR' and)*
    and   := unary ('AND' unary)*
    unary := 'NOT' unary | '(' expr ')' | cmp
    cmp   := NAME ('=' | '!=' | '<' | '<=' | '>' | '>=') value
           | NAME 'IN' '(' value (',' value)* ')'
           | NAME 'BETWEEN' value 'AND' value
    value := number | 'single-quoted' | "double-quoted" | bare-word

NAME is a metadata column seen at ingest (``meta_columns``) or one of the item columns
``id``, ``external_id``, ``source``. Values are always bound parameters. An unknown column or
a malformed expression raises :class:`FilterError` saying where and what is expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, not_, or_
from sqlalchemy.orm import Session

from .schema import Item, MetaColumn

ITEM_COLUMNS = {"id": Item.id, "external_id": Item.external_id, "source": Item.source}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])|(?P<str>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<op><=|>=|!=|=|<|>|\(|\)|,)|(?P<word>[A-Za-z_][\w.-]*))"
)
KEYWORDS = {"and", "or", "not", "in", "between"}


class FilterError(ValueError):
    """A filter expression that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Tok:
    kind: str  # num | str | op | word | end
    text: str
    pos: int


def tokenize(expr: str) -> list[Tok]:
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise FilterError(f"unexpected character {expr[pos:].lstrip()[:1]!r} at position {pos + 1 + len(expr[pos:]) - len(expr[pos:].lstrip())}")
        kind = m.lastgroup
        text = m.group(kind)
        out.append(Tok(kind, text, m.start(kind)))
        pos = m.end()
    out.append(Tok("end", "", len(expr)))
    return out


class _Parser:
    def __init__(self, expr: str, columns: dict[str, str]):
        self.toks = tokenize(expr)
        self.i = 0
        self.columns = columns  # metadata name -> number | text

    def peek(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def keyword(self, word: str) -> bool:
        t = self.peek()
        if t.kind == "word" and t.text.lower() == word:
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        t = self.take()
        if t.text.lower() != text:
            raise FilterError(f"expected {text!r} at position {t.pos + 1}, found {t.text or 'the end'!r}")

    def parse(self) -> ColumnElement[bool]:
        e = self.expr()
        t = self.peek()
        if t.kind != "end":
            raise FilterError(f"unexpected {t.text!r} at position {t.pos + 1}")
        return e

    def expr(self):
        parts = [self.conj()]
        while self.keyword("or"):
            parts.append(self.conj())
        return parts[0] if len(parts) == 1 else or_(*parts)

    def conj(self):
        parts = [self.unary()]
        while self.keyword("and"):
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else and_(*parts)

    def unary(self):
        if self.keyword("not"):
            return not_(self.unary())
        if self.peek().text == "(":
            self.take()
            e = self.expr()
            self.expect(")")
            return e
        return self.cmp()

    def value(self):
        t = self.take()
        if t.kind == "num":
            return float(t.text) if any(c in t.text for c in ".eE") else int(t.text)
        if t.kind == "str":
            return re.sub(r"\\(.)", r"\1", t.text[1:-1])
        if t.kind == "word" and t.text.lower() not in KEYWORDS:
            return t.text
        raise FilterError(f"expected a value at position {t.pos + 1}, found {t.text or 'the end'!r}")

    def column(self, name_tok: Tok, sample):
        name = name_tok.text
        if name in ITEM_COLUMNS:
            return ITEM_COLUMNS[name]
        kind = self.columns.get(name)
        if kind is None:
            known = sorted([*ITEM_COLUMNS, *self.columns])
            raise FilterError(f"unknown column {name!r} at position {name_tok.pos + 1}; known columns: {', '.join(known)}")
        if kind == "number":
            if not isinstance(sample, (int, float)):
                raise FilterError(f"column {name!r} holds numbers; {sample!r} is not one")
            return Item.meta[name].as_float()
        return Item.meta[name].as_string()

    def cmp(self):
        name = self.take()
        if name.kind != "word" or name.text.lower() in KEYWORDS:
            raise FilterError(f"expected a column name at position {name.pos + 1}, found {name.text or 'the end'!r}")
        if self.keyword("in"):
            self.expect("(")
            values = [self.value()]
            while self.peek().text == ",":
                self.take()
                values.append(self.value())
            self.expect(")")
            col = self.column(name, values[0])
            return col.in_([self._coerce(name.text, v) for v in values])
        if self.keyword("between"):
            lo = self.value()
            self.expect("and")
            hi = self.value()
            col = self.column(name, lo)
            return col.between(self._coerce(name.text, lo), self._coerce(name.text, hi))
        op = self.take()
        if op.kind != "op" or op.text not in ("=", "!=", "<", "<=", ">", ">="):
            raise FilterError(f"expected a comparison (=, !=, <, <=, >, >=, IN, BETWEEN) at position {op.pos + 1}")
        v = self.value()
        col = self.column(name, v)
        v = self._coerce(name.text, v)
        return {"=": col == v, "!=": col != v, "<": col < v, "<=": col <= v, ">": col > v, ">=": col >= v}[op.text]

    def _coerce(self, name: str, v):
        if self.columns.get(name) == "text" or name in ("external_id", "source"):
            return str(v)
        if name == "id" and not isinstance(v, int):
            raise FilterError(f"id must be an integer; got {v!r}")
        if self.columns.get(name) == "number" and not isinstance(v, (int, float)):
            raise FilterError(f"column {name!r} holds numbers; {v!r} is not one")
        return float(v) if self.columns.get(name) == "number" else v


def known_columns(session: Session) -> dict[str, str]:
    return {c.name: c.kind for c in session.query(MetaColumn)}


def parse(expr: str, columns: dict[str, str]) -> ColumnElement[bool]:
    """Parse ``expr`` against the metadata ``columns`` (name -> number | text)."""
    if not expr or not expr.strip():
        raise FilterError("empty filter expression")
    return _Parser(expr, columns).parse()


# ---- building expressions (front ends turn widget state into the same grammar) ---------------

_NAME = re.compile(r"[A-Za-z_][\w.-]*\Z")


def is_name(name: str) -> bool:
    """True when ``name`` can be written as a column in an expression."""
    return bool(_NAME.match(name)) and name.lower() not in KEYWORDS


def quote(value) -> str:
    """A literal for ``value``: numbers as they are, anything else single-quoted and escaped."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


def build(any_of: dict[str, list] | None = None, ranges: dict[str, tuple[float, float]] | None = None, extra: str = "") -> str:
    """AND of ``name IN (...)`` per ``any_of`` entry, ``name BETWEEN lo AND hi`` per range, and
    ``extra`` (a user-written expression, parenthesised); '' when there is nothing to filter."""
    parts = []
    for name, values in (any_of or {}).items():
        if values:
            parts.append(f"{name} IN ({', '.join(quote(v) for v in values)})")
    for name, (lo, hi) in (ranges or {}).items():
        parts.append(f"{name} BETWEEN {quote(lo)} AND {quote(hi)}")
    if extra and extra.strip():
        parts.append(f"({extra.strip()})")
    for name in [*(any_of or {}), *(ranges or {})]:
        if not is_name(name):
            raise FilterError(f"column {name!r} cannot be named in a filter expression")
    return " AND ".join(parts)
