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
a malformed expression raises :class:`FilterError` saying where and what is expected, and so
does an expression past the bounds below (a database or the parser's recursion would otherwise
fail with a raw error): nesting deeper than ``MAX_DEPTH``, more than ``MAX_TERMS`` comparisons,
more than ``MAX_IN_VALUES`` values in one IN list, an integer outside 64 bits, a number that is
not finite, or an expression longer than ``MAX_CHARS``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sqlalchemy import BigInteger, ColumnElement, and_, literal, not_, or_
from sqlalchemy.orm import Session

from .schema import Item, MetaColumn

ITEM_COLUMNS = {"id": Item.id, "external_id": Item.external_id, "source": Item.source}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])|(?P<str>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
    r"|(?P<op><=|>=|!=|=|<|>|\(|\)|,)|(?P<word>[A-Za-z_][\w.-]*))"
)
KEYWORDS = {"and", "or", "not", "in", "between"}
MAX_DEPTH = 32  # nested parentheses and NOTs
MAX_TERMS = 256  # comparisons in one expression
MAX_IN_VALUES = 1000  # values in one IN (...)
MAX_CHARS = 100_000
INT64 = (-(2**63), 2**63 - 1)


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
        self.depth = 0  # current nesting of parentheses and NOTs
        self.terms = 0  # comparisons so far

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
        t = self.peek()
        if t.text.lower() == "not" or t.text == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise FilterError(f"expression nested deeper than {MAX_DEPTH} levels (parentheses and NOTs) at position {t.pos + 1}")
            try:
                if self.keyword("not"):
                    return not_(self.unary())
                self.take()
                e = self.expr()
                self.expect(")")
                return e
            finally:
                self.depth -= 1
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise FilterError(f"more than {MAX_TERMS} comparisons in one expression (at position {t.pos + 1}); "
                              "use IN (...) for a list of values")
        return self.cmp()

    def value(self):
        t = self.take()
        if t.kind == "num":
            if any(c in t.text for c in ".eE"):
                v = float(t.text)
                if not math.isfinite(v):
                    raise FilterError(f"number {t.text} at position {t.pos + 1} is out of range")
                return v
            v = int(t.text)
            if not INT64[0] <= v <= INT64[1]:
                raise FilterError(f"integer {t.text[:30]}{'…' if len(t.text) > 30 else ''} at position {t.pos + 1} is out of range (64-bit)")
            return v
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
                if len(values) > MAX_IN_VALUES:
                    raise FilterError(f"more than {MAX_IN_VALUES} values in IN (...) at position {self.peek().pos + 1}")
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
        if name == "id":
            if not isinstance(v, int):
                raise FilterError(f"id must be an integer; got {v!r}")
            return literal(v, BigInteger)  # 64-bit: PostgreSQL would cast it to the 32-bit column type and overflow
        if self.columns.get(name) == "number" and not isinstance(v, (int, float)):
            raise FilterError(f"column {name!r} holds numbers; {v!r} is not one")
        return float(v) if self.columns.get(name) == "number" else v


def known_columns(session: Session) -> dict[str, str]:
    return {c.name: c.kind for c in session.query(MetaColumn)}


def parse(expr: str, columns: dict[str, str]) -> ColumnElement[bool]:
    """Parse ``expr`` against the metadata ``columns`` (name -> number | text)."""
    if not expr or not expr.strip():
        raise FilterError("empty filter expression")
    if len(expr) > MAX_CHARS:
        raise FilterError(f"filter expression longer than {MAX_CHARS} characters")
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
