"""Generic typed-config machinery: dict/YAML/overrides -> nested dataclasses, and back.

Each module owns its own config dataclass; this module knows none of them. It
turns plain data into any nested dataclass while collecting every problem
(unknown keys, wrong types, bad choices, ``problems()`` hooks) into one
:class:`QLoRAKitError`, writes resolved configs back as YAML, and renders a
``--help``-style reference from the field comments, so docs live in one place.

Supported field types: ``str, int, float, bool, Optional[X]`` / ``X | None``,
``Literal[...]``, ``list[X]`` and nested dataclasses. A field's documentation is
the ``# comment`` at the end of its line, or a string literal right after it.
A field's allowed range is declared with it (``bounded(16, ge=1)``) and checked
here, with every other problem; floats must always be finite.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Union

import yaml

from . import atomic
from .errors import QLoRAKitError

__all__ = [
    "bounded",
    "positional",
    "from_dict",
    "make",
    "to_dict",
    "parse_overrides",
    "load_config",
    "save_config",
    "describe",
    "field_docs",
]

# A problem is (dotted path, message); the path decides the prefix and the source.
Problem = tuple[str, str]

_FIX_HINT = (
    "Fix these in the config file or with overrides of the form section.key=value; "
    "`qlora-kit config` lists every key with its type, range, default and meaning."
)


# ------------------------------------------------------------------ declarations


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field: any of >= ge, > gt, <= le, < lt."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        for limit, ok, word in ((self.ge, lambda v, b: v >= b, ">="), (self.gt, lambda v, b: v > b, ">"),
                                (self.le, lambda v, b: v <= b, "<="), (self.lt, lambda v, b: v < b, "<")):
            if limit is not None and not ok(value, limit):
                return f"must be {self.text()}, got {_show(value)}"
        return None

    def text(self) -> str:
        parts = [f"{word} {_show(limit)}" for limit, word in
                 ((self.ge, ">="), (self.gt, ">"), (self.le, "<="), (self.lt, "<")) if limit is not None]
        return " and ".join(parts)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric field with its allowed range, declared once: ``rank: int = bounded(16, ge=1)``.

    ``None`` (for an Optional field) is always allowed; the range applies to numbers.
    """
    return dataclasses.field(default=default, metadata={"bounds": Bounds(ge, gt, le, lt)})


def positional(default: Any = dataclasses.MISSING, *, metavar: str | None = None) -> Any:
    """A command's positional argument (``qlora-kit merge ADAPTER OUT``) rather than a ``--flag``.

    A list default (``positional([])``) takes any number of values.
    """
    metadata = {"positional": True, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float.

    YAML 1.1 (PyYAML) only treats numbers with a dot and a signed exponent as
    floats, so learning rates written the natural way would arrive as strings.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _yaml_error_text(err: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a PyYAML error (marks are 0-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = " ".join((getattr(err, "problem", None) or str(err)).split())  # one line per problem
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _show(value: Any) -> str:
    """A value spelled the way the user would type it in YAML (null, true, [a, b])."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    except yaml.YAMLError:
        return repr(value)
    return text.removesuffix("...").strip()


# -------------------------------------------------------------------------- types


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field types (string annotations from ``__future__`` included)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward refs: fall back to what is not a string
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _type_name(tp: Any) -> str:
    """Human name of a field type, as used in error messages and the reference."""
    args = _union_args(tp)
    if args is not None:
        names = [_type_name(a) for a in args if a is not type(None)]
        suffix = " or null" if type(None) in args else ""
        return " or ".join(names) + suffix
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_show(c) for c in typing.get_args(tp))
    if origin in (list, tuple):
        inner = typing.get_args(tp)
        return f"list[{_type_name(inner[0])}]" if inner else "list"
    if _is_dataclass_type(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _got(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return f"{_show(value)} ({type(value).__name__})"


# ---------------------------------------------------------------- dict -> objects


def _coerce(value: Any, tp: Any, path: str) -> tuple[Any, list[Problem]]:
    """Check ``value`` against ``tp``; return the (converted) value and problems."""
    args = _union_args(tp)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None, []
            return None, [(path, f"expected {_type_name(tp)}, got null")]
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            converted, problems = _coerce(value, options[0], path)
            # Say "int or null" when the value itself is wrong, so null is known to be allowed.
            if [p for p, _ in problems] == [path] and problems[0][1].startswith("expected "):
                problems = [(path, f"expected {_type_name(tp)}, got {_got(value)}")]
            return converted, problems
        for option in options:  # general unions: first member that accepts it
            converted, problems = _coerce(value, option, path)
            if not problems:
                return converted, []
        return None, [(path, f"expected {_type_name(tp)}, got {_got(value)}")]

    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            # YAML 1.1 reads a bare `no`/`yes` as a bool; the user meant the choice.
            value = "no" if value is False else "yes"
        # `True == 1` in Python, so compare types too: 1 must not pass for Literal[True].
        if any(value == c and type(value) is type(c) for c in choices):
            return value, []
        return None, [(path, f"expected one of {', '.join(_show(c) for c in choices)}; got {_got(value)}")]

    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return None, [(path, f"expected {_type_name(tp)}, got {_got(value)}")]
        inner = typing.get_args(tp)
        if not inner:
            return list(value), []
        items, problems = [], []
        for i, item in enumerate(value):
            converted, item_problems = _coerce(item, inner[0], f"{path}[{i}]")
            items.append(converted)
            problems += item_problems
        return items, problems

    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            return None, [(path, f"expected a section (mapping of keys to values), got {_got(value)}")]
        return _build(tp, value, path)

    return _coerce_scalar(value, tp, path)


def _coerce_scalar(value: Any, tp: Any, path: str) -> tuple[Any, list[Problem]]:
    if tp is Any:
        return value, []
    if tp is float:
        # bool is a subclass of int; `lr: true` is a mistake, not 1.0.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), []
        if isinstance(value, str):  # e.g. "1e-4" from a plain YAML 1.1 loader
            try:
                return float(value.strip()), []
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, []
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value, []
    else:
        return value, []  # a type this module does not model: pass it through
    return None, [(path, f"expected {_type_name(tp)}, got {_got(value)}")]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unknown_key(path: str, key: str, valid: list[str]) -> Problem:
    message = "unknown key"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean '{close[0]}'?"
    return (path, f"{message} (valid keys: {', '.join(valid)})")


def _build(cls: type, data: dict, prefix: str) -> tuple[Any, list[Problem]]:
    """Structural pass: build ``cls`` from ``data``; bad fields fall back to defaults.

    Returns the object (None if it cannot be built at all) and the problems, so
    the caller can report everything at once instead of stopping at the first.
    """
    hints = _type_hints(cls)
    settable = [f for f in dataclasses.fields(cls) if f.init]
    by_name = {f.name: f for f in settable}
    problems: list[Problem] = []
    kwargs: dict[str, Any] = {}

    for key, value in data.items():
        field = by_name.get(key) if isinstance(key, str) else None
        if field is None:
            problems.append(_unknown_key(_join(prefix, str(key)), str(key), list(by_name)))
            continue
        converted, field_problems = _coerce(value, hints.get(key, Any), _join(prefix, key))
        if not field_problems:
            field_problems = _range_problems(converted, field, _join(prefix, key))
        problems += field_problems
        # A nested section with problems may still be built (with defaults in its bad
        # fields); keep it so its siblings are checked and defaults stay consistent.
        if not field_problems or (converted is not None and dataclasses.is_dataclass(converted)):
            kwargs[key] = converted

    for f in settable:
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in data and not has_default:
            problems.append((_join(prefix, f.name), "missing required key"))

    try:
        return cls(**kwargs), problems
    except (TypeError, ValueError, QLoRAKitError) as err:  # __post_init__ validation, missing keys
        if not any(p[1] == "missing required key" for p in problems):
            problems.append((prefix, str(err)))
        return None, problems


def _range_problems(value: Any, field: dataclasses.Field, path: str) -> list[Problem]:
    """A number outside its declared bounds, or a float that is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, f"must be a finite number, got {_show(value)}")]
    bounds = field.metadata.get("bounds")
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    message = bounds.problem(value)
    return [(path, message)] if message else []


def _semantic_problems(obj: Any, path: str, blocked: list[str]) -> list[Problem]:
    """Run ``problems()`` on every nested dataclass, innermost first.

    Sections with structural problems are skipped: their bad fields were replaced
    by defaults, so cross-field checks would report misleading things.
    """
    found: list[Problem] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found += _semantic_problems(value, _join(path, f.name), blocked)
    is_blocked = any(b == path or not path or b.startswith(path + ".") for b in blocked)
    hook = getattr(obj, "problems", None)
    if callable(hook) and not is_blocked:
        found += [(path, str(message)) for message in hook() or ()]
    return found


def _collect(cls: type, data: Any, prefix: str) -> tuple[Any, list[Problem]]:
    if not isinstance(data, dict):
        return None, [(prefix, f"expected a mapping of keys to values, got {_got(data)}")]
    obj, problems = _build(cls, data, prefix)
    if obj is not None:
        problems += _semantic_problems(obj, prefix, [p for p, _ in problems])
    return obj, problems


def _raise(problems: list[Problem], source: Callable[[str], str | None], *,
           name: Callable[[str], str] = lambda path: path, hint: str = _FIX_HINT) -> typing.NoReturn:
    lines = []
    for path, message in problems:
        origin = source(path)
        text = f"{name(path)}: {message}" if path else message
        lines.append(f"  {origin}: {text}" if origin else f"  {text}")
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    raise QLoRAKitError(f"Invalid configuration ({count}):\n" + "\n".join(lines) + "\n" + hint)


def from_dict(cls: type, data: dict, *, path_prefix: str = "", source: str | None = None,
              name: Callable[[str], str] = lambda path: path, hint: str = _FIX_HINT) -> Any:
    """Build dataclass ``cls`` (nested sections included) from a plain dict.

    Every problem is collected first; then one QLoRAKitError lists them all, one
    per line, each prefixed with ``source`` (e.g. the file name) when given.
    ``name`` renders a key's path (the command line shows ``--max-shard-size``);
    ``hint`` closes the message with where to look up the valid keys.
    """
    obj, problems = _collect(cls, data, path_prefix)
    if problems:
        _raise(problems, lambda _path: source, name=name, hint=hint)
    return obj


def make(cls: type, **values: Any) -> Any:
    """``cls(**values)`` with every check a config file gets (types, choices, ranges), for library calls.

    Paths are accepted where strings are declared.
    """
    return from_dict(cls, to_dict(values))


# ---------------------------------------------------------------- objects -> dict


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list/scalar copy of a (nested) dataclass, in field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]  # tuples become lists: safe_dump rejects tuples
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_config(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` (dataclass or dict) as YAML, atomically (`atomic.write_text`).

    A crash mid-write never leaves a truncated config in a run folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return atomic.write_text(path, text)


# ---------------------------------------------------------------------- overrides


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _parse_overrides(items: Iterable[str]) -> tuple[dict, list[Problem]]:
    result: dict = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            problems.append(("", f"override {item!r}: expected the form section.key=value"))
            continue
        try:
            # Empty means empty string; `null` is the explicit way to say None.
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            problems.append(("", f"override {item!r}: value is not valid YAML ({_yaml_error_text(err)})"))
            continue
        *sections, leaf = key.split(".")
        node = result
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                child = node[section] = {}  # later, deeper override wins over a scalar
            node = child
        node[leaf] = value  # the same key twice: the last one wins, as on most CLIs
    return result, problems


def parse_overrides(items: Iterable[str]) -> dict:
    """``["lora.rank=8", "data.packing=true"]`` -> ``{"lora": {"rank": 8}, "data": {"packing": True}}``.

    Values follow YAML scalar rules (``true``, ``8``, ``null``, ``[a,b]``, ``1e-4``).
    Malformed items are all reported in one QLoRAKitError.
    """
    result, problems = _parse_overrides(items)
    if problems:
        _raise(problems, lambda _path: None)
    return result


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = _join(prefix, str(key))
        out += _paths(value, path) if isinstance(value, dict) and value else [path]
    return out


# ------------------------------------------------------------------------ loading


def _read_yaml(path: Path) -> tuple[dict, list[Problem]]:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        return {}, [("", f"config file {what}: {path}")]
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        return {}, [("", f"invalid YAML in {path}: {_yaml_error_text(err)}")]
    except (OSError, UnicodeDecodeError) as err:
        return {}, [("", f"cannot read config file {path}: {err}")]
    if data is None:  # an empty file means "all defaults"
        return {}, []
    if not isinstance(data, dict):
        return {}, [("", f"{path}: top level must be a mapping of sections, got {_got(data)}")]
    return data, []


def load_config(cls: type, path: str | Path | None, overrides: Iterable[str] = ()) -> Any:
    """Read YAML ``path`` (None: defaults only), merge ``overrides`` on top, build ``cls``.

    Problems from the file and the overrides are reported together in one error;
    each line says whether it comes from the file or from an override.
    """
    data, problems = _read_yaml(Path(path)) if path is not None else ({}, [])
    override_tree, override_problems = _parse_overrides(overrides)
    problems += override_problems
    if problems:
        _raise(problems, lambda _path: None)

    overridden = _paths(override_tree)
    file_name = Path(path).name if path is not None else None

    def source(problem_path: str) -> str | None:
        hit = any(problem_path == o or problem_path.startswith(o + ".") or problem_path.startswith(o + "[")
                  for o in overridden)
        return "override" if hit else file_name

    obj, problems = _collect(cls, _deep_merge(data, override_tree), "")
    if problems:
        _raise(problems, source)
    return obj


# -------------------------------------------------------------------- field docs


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> dict[str, str]:
    """Docs for fields declared in ``cls`` itself, read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return {}  # no source (REPL, frozen app): fields simply have no docs
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    class_def = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if class_def is None:
        return {}
    docs: dict[str, str] = {}
    body = class_def.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        # The trailing comment sits on the statement's last line (multi-line field() calls too).
        if stmt.end_lineno in comments:
            docs[name] = comments[stmt.end_lineno]
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docstring = inspect.cleandoc(nxt.value.value)
            docs[name] = f"{docs[name]} {docstring}" if name in docs else docstring
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: documentation}`` for dataclass ``cls``, inherited fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _class_summary(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # dataclasses invent a "Name(field: type, ...)" docstring when none is written.
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc).splitlines()[0]


def describe(cls: type, *, prefix: str = "") -> str:
    """``--help``-style reference: ``section.key (type, default X): doc`` for every field."""
    hints = _type_hints(cls)
    docs = field_docs(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = _join(prefix, f.name)
        tp = hints.get(f.name, Any)
        doc = docs.get(f.name, "")
        if _is_dataclass_type(tp):
            summary = doc or _class_summary(tp)
            lines.append(f"{path}:" + (f" {summary}" if summary else ""))
            lines.append(describe(tp, prefix=path))
            continue
        default = _default_of(f)
        shown = "required" if default is dataclasses.MISSING else f"default {_show(to_dict(default))}"
        bounds = f.metadata.get("bounds")
        kind = f"{_type_name(tp)} {bounds.text()}" if bounds else _type_name(tp)
        line = f"{path} ({kind}, {shown})"
        lines.append(f"{line}: {doc}" if doc else line)
    return "\n".join(line for line in lines if line)
