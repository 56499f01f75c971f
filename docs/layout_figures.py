"""The layout figures of docs/design.md S7.5: lines per package of ``simvg/``, the function sizes and the ten longest
functions (nested functions and methods count on their own), the imports inside function bodies, and the check of
the layers of S7.4 (import cycles, and imports of a module in a later layer).

Usage: ``python docs/layout_figures.py [REV]`` (REV: a git revision, read with ``git show``; default: the files on
disk). Lines are physical lines as ``wc -l`` counts them; a function's size runs from its ``def`` to its last line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layers of docs/design.md S7.4, first to last: a module imports only modules of its own layer or earlier ones.
# A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("simvg.errors", "simvg.utils"),
    ("simvg.models", "simvg.synthref", "simvg.data"),  # the data modules that read no config section
    ("simvg.config",),
    ("simvg.data.datasets", "simvg.data.loaders", "simvg.losses"),
    ("simvg.artifact",),
    ("simvg.engine",),
    ("simvg.pretrain",),
    ("simvg.inference",),
    ("simvg.serve", "simvg.export"),
    ("simvg.cli", "simvg.__main__"),
]


def sources(rev: str | None) -> dict[str, str]:
    """Path -> text of every simvg/**/*.py, at `rev` or in the working tree."""
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "simvg").rglob("*.py"))}
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "simvg"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for n in names
        if n.endswith(".py")
    }


def package(path: str) -> str:
    """simvg/engine/train.py -> simvg/engine; simvg/cli.py -> simvg (top level)."""
    parts = path.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else "simvg (top level)"


def functions(tree: ast.AST, path: str) -> list[tuple[int, str]]:
    """(lines, 'path:line name') of every function and method, nested ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    return out


def inner_imports(tree: ast.AST, path: str) -> list[tuple[str, int]]:
    """(path, line) of every import statement inside a function body."""
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.add((path, node.lineno))
    return sorted(found)


def module_name(path: str) -> str:
    """simvg/engine/train.py -> simvg.engine.train; simvg/data/__init__.py -> simvg.data."""
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def module_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The ``simvg`` modules imported at module level (``if TYPE_CHECKING:`` blocks and function bodies excluded);
    ``from simvg import artifact`` counts as importing ``simvg.artifact``, not the package."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found & known


def layer(module: str) -> int | None:
    """Index in ``LAYERS`` of ``module`` (its longest matching prefix); None when no layer names it."""
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), i)
    return best[1] if best else None


def layer_report(graph: dict[str, set[str]]) -> tuple[list[list[str]], list[str], list[str]]:
    """(import cycles, imports of a later layer as 'a -> b', modules no layer names) of the module graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    upward = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]  # fmt: skip
    unplaced = sorted(m for m in graph if m != "simvg" and layer(m) is None)
    return cycles, upward, unplaced


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else None
    files = sources(rev)
    lines: Counter[str] = Counter()
    funcs: list[tuple[int, str]] = []
    imports: list[tuple[str, int]] = []
    known = {module_name(path) for path in files}
    graph: dict[str, set[str]] = {}
    for path, text in files.items():
        lines[package(path)] += len(text.splitlines())
        tree = ast.parse(text)
        funcs += functions(tree, path)
        imports += inner_imports(tree, path)
        graph[module_name(path)] = module_imports(tree, known) - {module_name(path), "simvg"}
    print(f"lines per package ({rev or 'working tree'}):")
    for name, n in sorted(lines.items()):
        print(f"  {name:24s} {n:6d}")
    print(f"  {'total':24s} {sum(lines.values()):6d}")
    sizes = sorted(n for n, _ in funcs)
    print(f"functions: {len(funcs)}, median {sizes[len(sizes) // 2]} lines, p90 {sizes[int(len(sizes) * 0.9)]}")
    print("ten longest functions:")
    for n, name in sorted(funcs, key=lambda f: (-f[0], f[1]))[:10]:
        print(f"  {n:4d}  {name}")
    print(f"imports inside functions: {len(imports)}")
    for path, line in imports:
        print(f"  {path}:{line}")
    cycles, upward, unplaced = layer_report(graph)
    print(f"import cycles: {len(cycles)}; imports of a later layer (S7.4): {len(upward)}")
    for item in [" <-> ".join(c) for c in cycles] + upward:
        print(f"  {item}")
    if unplaced:
        print(f"modules in no layer: {', '.join(unplaced)}")


if __name__ == "__main__":
    main()
