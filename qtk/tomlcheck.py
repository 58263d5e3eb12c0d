"""Reading the TOML files users write (``qtk provision`` manifests, ``qtk serve --access`` files): bounded,
checked against a schema, and every refusal points at ``file:line`` and the field.

One reader for both, so that a manifest and an access file fail closed the same way:

* **size**: at most :data:`MAX_BYTES`;
* **nesting**: at most :data:`MAX_DEPTH` levels. Python's TOML parser recurses once per array or inline
  table level (50,000 levels is a ``RecursionError``) and takes quadratic time in the parts of a dotted
  key (50,000 parts: a minute), so both are counted on the text, outside strings and comments, *before*
  it parses; table headers and dotted keys together still nest, so the parsed data is measured again,
  iteratively;
* **schema** (:class:`Checker`): an unknown key is refused with a close-match suggestion ("did you mean
  'private'?") and the keys allowed there; a value of the wrong type is refused (``true`` is not a number,
  ``"acme"`` is not an array of strings: :class:`Array`).

Messages read ``FILE:LINE: models[0].recipes[1].group_size: must be ...``; the line comes from
:class:`Locator`, which addresses the text like the parsed data.

This module sits below ``qtk.hub`` and ``qtk.provision`` (it imports only :mod:`qtk.errors`).
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from . import errors

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a declared dependency there)
    import tomli as tomllib

__all__ = ["MAX_BYTES", "MAX_DEPTH", "Array", "Checker", "Locator", "dotted", "read_toml"]

MAX_BYTES = 4 * 1024 * 1024  # a manifest with hundreds of models is tens of kB
MAX_DEPTH = 32  # a manifest nests 6 levels (models[i].recipes[j].gates.x); an access file 4

# the tokens that matter for nesting, in the order TOML reads them: strings and comments hide brackets
_TOKEN = re.compile(r'''
    (?P<mlb>"""(?:[^"\\]|\\.|"{1,2}(?!"))*(?:"{3,5}|\Z))     # multi-line basic string (escapes)
  | (?P<mll>\'\'\'(?:[^']|'{1,2}(?!'))*(?:'{3,5}|\Z))         # multi-line literal string
  | (?P<str>"(?:[^"\\\n]|\\[^\n])*"?                          # basic string
  | '[^'\n]*'?)                                              # literal string
  | \#[^\n]*                                                  # comment
  | (?P<open>[\[{]) | (?P<close>[\]}]) | (?P<nl>\n)
  | (?P<dot>\.) | (?P<word>[A-Za-z0-9_+:-]+) | (?P<sep>[=,])
''', re.VERBOSE | re.DOTALL)
_KEY_PART = re.compile(r'[ \t]*(?:([A-Za-z0-9_-]+)|"((?:[^"\\\n]|\\[^\n])*)"|\'([^\'\n]*)\')[ \t]*')


@dataclass(frozen=True)
class Array:
    """Schema type: an array whose every item is of type ``item`` (``Array(str)``: names, patterns)."""

    item: type


_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
               "list": "an array", "dict": "a table"}


def _type_name(t) -> str:
    if isinstance(t, Array):
        return f"an array of {_TYPE_NAMES[t.item.__name__].split(' ', 1)[1]}s"
    return _TYPE_NAMES[t.__name__]


def dotted(path: tuple) -> str:
    """``("models", 0, "recipes", 1, "bits")`` -> ``models[0].recipes[1].bits``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _nesting(text: str, limit: int) -> tuple[tuple[int, str] | None, set[int]]:
    """One pass over the text outside strings and comments: ((the line, what) where the nesting first
    exceeds ``limit``: brackets, or the parts of one dotted key, which tomllib handles in quadratic time;
    or None), and the lines that continue a value (inside brackets or a multi-line string)."""
    depth, line, inner, chain, after_dot = 0, 1, set(), 0, False
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind in ("word", "str"):
            chain = chain + 1 if after_dot else 1
            if chain > limit:
                return (line, f"a dotted key of more than {limit} parts"), inner
        after_dot = kind == "dot"
        if kind not in ("word", "str", "dot"):
            chain = 0
        if kind == "nl":
            line += 1
            if depth:
                inner.add(line)
        elif kind == "open":
            depth += 1
            if depth > limit:
                return (line, f"arrays or inline tables nested deeper than {limit} levels"), inner
        elif kind == "close":
            depth = max(0, depth - 1)
        elif kind in ("mlb", "mll"):
            n = m.group().count("\n")
            inner.update(range(line + 1, line + n + 1))
            line += n
    return None, inner


def _data_depth(obj) -> int:
    """How deep tables and arrays nest in parsed data (iterative: the data may be deeper than the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        children = o.values() if isinstance(o, dict) else o
        stack += [(c, d + 1) for c in children if isinstance(c, (dict, list))]
    return deepest


class Locator:
    """Line numbers of tables and keys in a TOML text, addressed like the parsed data:
    ``("models", 1, "recipes", 0, "group_size")``. Covers ``[table]``, ``[[array]]`` and ``key = value``
    lines (quoted and dotted keys too); lines inside a multi-line value are not mistaken for keys."""

    def __init__(self, text: str, skip: set[int] = frozenset()) -> None:
        self.lines: dict[tuple, int] = {}
        counters: dict[tuple, int] = {}
        current: tuple = ()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#") or lineno in skip:
                continue
            if line.startswith("[["):
                names = _key(line, 2, "]]")
                if names:
                    key = self._resolve(names[:-1], counters) + (names[-1],)
                    counters[key] = counters.get(key, -1) + 1
                    current = key + (counters[key],)
                    self.lines.setdefault(key, lineno)
                    self.lines[current] = lineno
            elif line.startswith("["):
                names = _key(line, 1, "]")
                if names:
                    current = self._resolve(names, counters)
                    self.lines[current] = lineno
            elif names := _key(line, 0, "="):
                self.lines.setdefault(current + names, lineno)

    @staticmethod
    def _resolve(names: tuple, counters: dict) -> tuple:
        path: tuple = ()
        for n in names:
            path += (n,)
            if path in counters:
                path += (counters[path],)
        return path

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _is(v, t: type) -> bool:
    """``isinstance``, where true/false is not a number."""
    return isinstance(v, t) and not (isinstance(v, bool) and t is not bool)


def _key(line: str, pos: int, end: str) -> tuple | None:
    """The dotted key at ``pos`` in ``line`` followed by ``end`` (``=``, ``]`` or ``]]``), or None."""
    parts = []
    while True:
        m = _KEY_PART.match(line, pos)
        if not m:
            return None
        bare, basic, literal = m.groups()
        if basic is not None:
            try:
                basic = json.loads(f'"{basic}"')
            except ValueError:
                pass
        parts.append(bare if bare is not None else basic if basic is not None else literal)
        pos = m.end()
        if line.startswith(".", pos):
            pos += 1
            continue
        return tuple(parts) if line.startswith(end, pos) else None


class Checker:
    """Schema checks with ``file:line: field:`` messages, raised as ``error`` (a :class:`~qtk.errors.QtkError`
    subclass) with ``hint`` unless a check gives a more precise one."""

    def __init__(self, file: Path, text: str, *, error: type[errors.QtkError] = errors.UsageError,
                 hint: str | None = None, skip: set[int] = frozenset()) -> None:
        self.file, self.loc, self.error, self.hint = file, Locator(text, skip), error, hint

    def fail(self, path: tuple, message: str, hint: str | None = None) -> errors.QtkError:
        line = self.loc.line(path)
        where = f"{self.file}:{line}" if line else str(self.file)
        field_ = f" {dotted(path)}:" if path else ""
        return self.error(f"{where}:{field_} {message}", hint=hint or self.hint)

    def table(self, value, schema: dict, path: tuple, *, required: tuple[str, ...] = ()) -> dict:
        """``value`` must be a table whose keys are in ``schema`` (key -> type, tuple of types, or
        :class:`Array`) and hold values of those types; ``required`` keys must be present."""
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a table, got {type(value).__name__}.")
        for key, v in value.items():
            if key not in schema:
                close = difflib.get_close_matches(key, list(schema), n=1)
                raise self.fail(path + (key,), "unknown field" + (f"; did you mean {close[0]!r}?" if close else "."),
                                hint=f"Fields allowed here: {', '.join(sorted(schema))}.")
            self.check_type(v, schema[key], path + (key,))
        for key in required:
            if key not in value:
                raise self.fail(path, f"missing required field {key!r}.")
        return value

    def check_type(self, v, want, path: tuple) -> None:
        types = want if isinstance(want, tuple) else (want,)
        for t in types:
            if isinstance(t, Array) and isinstance(v, list) and all(_is(x, t.item) for x in v):
                return
            if not isinstance(t, Array) and _is(v, t):
                return
        names = " or ".join(_type_name(t) for t in types)
        raise self.fail(path, f"expected {names}, got {type(v).__name__} {v!r}.")


def read_toml(path: str | Path, *, what: str, error: type[errors.QtkError] = errors.UsageError,
              hint: str | None = None, missing_hint: str | None = None) -> tuple[dict, Checker]:
    """Read, bound and parse the TOML file ``path`` (``what``: "Manifest", "Access file" in messages).
    Returns the data and a :class:`Checker` over its text; refusals are ``error``."""
    file = Path(path).expanduser()
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{what} {file} not found.", hint=missing_hint or hint) from None
    except OSError as exc:
        raise error(f"Cannot read {what.lower()} {file}: {exc.strerror or exc}.", hint=hint) from None
    if len(raw) > MAX_BYTES:
        raise error(f"{what} {file} is larger than {MAX_BYTES // 1024 // 1024} MiB: not a configuration file.",
                    hint=hint)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {file} is not UTF-8 text (byte {exc.start}).", hint=hint) from None
    too_deep, inner = _nesting(text, MAX_DEPTH)
    if too_deep is not None:
        raise error(f"{file}:{too_deep[0]}: {too_deep[1]}.", hint=hint)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # the message carries "(at line L, column C)"
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{file}:{m.group(1)}:{m.group(2)}" if m else str(file)
        raise error(f"{where}: TOML syntax error: {str(exc).split(' (at line')[0]}.", hint=hint) from None
    except RecursionError:  # not reached with the bound above; a parser change must still fail cleanly
        raise error(f"{file}: nested too deeply to read.", hint=hint) from None
    except ValueError:  # int() of an integer over Python's digit limit (4300): not a TOMLDecodeError
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300
        m = re.search(r"[0-9_]{%d,}" % limit, text)
        where = f"{file}:{text.count(chr(10), 0, m.start()) + 1}" if m else str(file)
        raise error(f"{where}: an integer too long to read (over {limit} digits).", hint=hint) from None
    if _data_depth(data) > MAX_DEPTH:
        raise error(f"{file}: tables nested deeper than {MAX_DEPTH} levels (dotted keys or table headers).",
                    hint=hint)
    return data, Checker(file, text, error=error, hint=hint, skip=inner)
