"""The package's modules form layers: no import circle, counting the imports inside functions (a
function-level import that closes a circle is a circle), and no module imports another's
private (underscore) names. Read from the source with ``ast``; imports under ``TYPE_CHECKING``
are annotations only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"interp": ROOT / "interp", "interp.model": ROOT / "model", "interp.hooks": ROOT / "hooks"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, list[str], int]]]:
    """``{module: [(imported module, names, line), ...]}`` for imports of the package's own modules."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for name, path in mods.items():
        found: list[tuple[str, list[str], int]] = []

        def visit(node: ast.AST, name: str = name, path: Path = path, found: list = found) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                if isinstance(child, ast.ImportFrom):
                    target = _absolute(name, path.name == "__init__.py", child.level, child.module)
                    if target in mods:
                        subs = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in mods]
                        found.extend((s, [], child.lineno) for s in subs)
                        found.append((target, [a.name for a in child.names], child.lineno))
                elif isinstance(child, ast.Import):
                    found.extend((a.name, [], child.lineno) for a in child.names if a.name in mods)
                visit(child)
        visit(ast.parse(path.read_text()))
        out[name] = found
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    mods = modules()
    assert len(mods) > 90
    graph = {m: {t for t, _, _ in found if t != m} for m, found in imports(mods).items()}
    bad = circles(graph)
    assert not bad, ("import circles (give the shared part a module of its own below both, or import "
                     f"only for types under TYPE_CHECKING): {bad}")


def test_no_private_names_cross_modules():
    mods = modules()
    bad = [f"{mods[m].relative_to(ROOT)}:{line}: {name} from {target}"
           for m, found in imports(mods).items() for target, names, line in found
           for name in names if name.startswith("_") and not name.startswith("__") and target != m]
    assert not bad, "underscore names are a module's own; make the name public or move it:\n" + "\n".join(bad)
