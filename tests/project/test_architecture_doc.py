"""docs/architecture.md shows signatures from the code; this keeps them true. Each ```python block
names its module in a first-line comment; every `def` in it must match that function's (or, under
a `class`, that method's) parameters, defaults and keyword-only marker."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
BLOCK = re.compile(r"```python\n# (\S+\.py)\n(.*?)```", re.S)


def _shown() -> list[tuple[str, str | None, str]]:
    """(module, class or None, def line) for every def the document shows."""
    out = []
    for path, body in BLOCK.findall(DOC.read_text()):
        module = path[:-3].replace("/", ".")
        cls = None
        for line in body.splitlines():
            if m := re.match(r"class (\w+)", line):
                cls = m.group(1)
            elif m := re.match(r"(\s*)(?:async )?def ", line):
                out.append((module, cls if m.group(1) else None, line.strip()))
    return out


def _params(def_line: str) -> list[tuple[str, str, str | None]]:
    """(kind, name, default source) of a shown def, parsed by Python itself."""
    src = def_line.removeprefix("async ").rstrip(":") + ": pass"
    fn = ast.parse(src).body[0]
    a = fn.args
    out = [("positional", p.arg, None) for p in a.posonlyargs + a.args]
    defaults = [None] * (len(out) - len(a.defaults)) + [ast.unparse(d) for d in a.defaults]
    out = [(k, n, d) for (k, n, _), d in zip(out, defaults)]
    if a.vararg:
        out.append(("varargs", a.vararg.arg, None))
    out += [("keyword", p.arg, None if d is None else ast.unparse(d)) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append(("varkw", a.kwarg.arg, None))
    return out


def _actual(fn) -> list[tuple[str, str, str | None]]:
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.VAR_POSITIONAL: "varargs", inspect.Parameter.KEYWORD_ONLY: "keyword",
             inspect.Parameter.VAR_KEYWORD: "varkw"}
    out = []
    for p in inspect.signature(inspect.unwrap(fn)).parameters.values():
        default = None
        if p.default is not inspect.Parameter.empty:
            default = repr(p.default)
            if type(p.default).__name__ == "Depends":
                default = f"Depends({p.default.dependency.__name__})"
        out.append((kinds[p.kind], p.name, default))
    return out


SHOWN = _shown()


def test_the_document_shows_signatures():
    assert len(SHOWN) >= 15


@pytest.mark.parametrize("module, cls, line", SHOWN, ids=[f"{m}:{line.split('(')[0].split()[-1]}" for m, _, line in SHOWN])
def test_shown_signature_matches_the_code(module, cls, line):
    name = re.search(r"def (\w+)", line).group(1)
    owner = importlib.import_module(module)
    if cls is not None:
        owner = getattr(owner, cls)
    elif not hasattr(owner, name):   # a method shown without its class: find the one class that has it
        owners = [c for _, c in inspect.getmembers(owner, inspect.isclass)
                  if c.__module__ == owner.__name__ and name in vars(c)]
        assert len(owners) == 1, f"{name} in {module}: {owners}"
        owner = owners[0]
    fn = getattr(owner, name)
    shown = [(k, n, d) for k, n, d in _params(line)]
    actual = _actual(fn)
    if shown and shown[0][1] in ("self", "cls") and (not actual or actual[0][1] != shown[0][1]):
        shown = shown[1:]   # bound or class methods: inspect drops self/cls
    assert shown == actual, f"docs/architecture.md shows {line!r}; the code has {inspect.signature(fn)}"
