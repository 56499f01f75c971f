"""The layout figures of docs/design.md S7.5: lines per package of ``simvg/``, the function sizes and the ten longest
functions (nested functions and methods count on their own), and the imports inside function bodies.

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


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else None
    files = sources(rev)
    lines: Counter[str] = Counter()
    funcs: list[tuple[int, str]] = []
    imports: list[tuple[str, int]] = []
    for path, text in files.items():
        lines[package(path)] += len(text.splitlines())
        tree = ast.parse(text)
        funcs += functions(tree, path)
        imports += inner_imports(tree, path)
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


if __name__ == "__main__":
    main()
