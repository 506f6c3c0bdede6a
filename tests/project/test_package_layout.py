"""The package layout's promises: the wire format is shared without the client's HTTP stack, and
the client's modules import each other without a circle (at any depth, lazy imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_server_imports_the_wire_format_without_the_client_or_httpx():
    code = ("import sys, clce_server.app, clce_server.rails.scheduler, clce_wire; "
            "bad = sorted(m for m in ('httpx', 'clce_client', 'torch') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def _package_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).glob("*.py")):
        name = path.stem
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith(package + "."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
        graph[name] = {d for d in deps if (ROOT / package / f"{d}.py").exists() and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


@pytest.mark.parametrize("package", ["clce_client", "clce_wire"])
def test_no_import_circle(package):
    graph = _package_imports(package)
    assert graph, "no modules found"
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_circle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _hash_seeded(path: Path) -> list[int]:
    """Lines where random test data is seeded from hash(), which differs from process to process
    for strings (PYTHONHASHSEED is read at interpreter start, too late to set from a conftest)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "default_rng", "seed", "RandomState", "manual_seed", "Random"):
            if any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "hash" for a in node.args for n in ast.walk(a)):
                lines.append(node.lineno)
    return lines


def test_test_data_is_seeded_deterministically(tmp_path):
    found = {str(p.relative_to(ROOT)): _hash_seeded(p) for p in sorted((ROOT / "tests").rglob("*.py"))}
    assert not {k: v for k, v in found.items() if v}
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np\nrng = np.random.default_rng(hash(('a', 1)) % 2**32)\n")
    assert _hash_seeded(bad) == [2]


def _imported_modules(path: Path) -> list[str]:
    """Every module an `import` or `from ... import` in `path` names (lazy imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_the_test_tree_mirrors_the_packages_and_no_test_module_imports_another():
    """Test files live in a folder per package or operation, helpers in tests/support (not
    collected); a test module imports helpers from there, never from another test module."""
    folders = {"wire", "cross_entropy", "linear", "rails", "client", "project"}
    tests = sorted((ROOT / "tests").rglob("test_*.py"))
    assert tests and {p.parent.name for p in tests} <= folders, sorted({str(p.parent) for p in tests})
    assert not list((ROOT / "tests" / "support").glob("test_*.py"))
    for folder in (ROOT / "tests", *(ROOT / "tests" / f for f in folders), ROOT / "tests" / "support"):
        assert (folder / "__init__.py").exists(), folder     # packages: equal basenames in two folders
    offenders = {str(p.relative_to(ROOT)): bad for p in sorted((ROOT / "tests").rglob("*.py"))
                 if (bad := [m for m in _imported_modules(p) if m.split(".")[-1].startswith("test_")])}
    assert not offenders, offenders
