"""The package layout, measured: imports between sagan_cli's sub-packages, and its longest modules and functions.

    python benchmarks/import_graph.py

Every module's imports are read with `ast` (the modules are not imported), so function-level imports count
too. Prints the package-level graph as `from -> to  (names imported)` edges, the problems `tests/test_layout.py`
refuses (a cycle, a library package importing the command line, a private name imported across packages,
library code importing the old-path shims), then the longest modules and functions.
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sagan_cli"
CORE = {"sagan_cli", "sagan_cli.config", "sagan_cli.errors"}  # the version, the recipe and the error type
SHIMS = {"layers", "models", "sample", "attention", "metrics"}  # old flat paths, kept for users' imports
COMMAND_LINE = "cli"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted
    names: tuple[str, ...]  # the names taken from it (empty for `import x`)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The node a module belongs to: its sub-package, `core`, `shims`, or `main` for `python -m sagan_cli`."""
    parts = module.split(".")
    if module in CORE:
        return "core"
    if len(parts) == 2 and parts[1] in SHIMS:
        return "shims"
    if len(parts) == 2 and parts[1] == "__main__":
        return "main"
    return parts[1]


def imports_of(path: Path) -> list[Import]:
    """Every `sagan_cli` import in one file, at any depth; `from sagan_cli import x` counts as module x when
    x is a module or sub-package."""
    module = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, ()) for a in node.names if a.name.split(".")[0] == "sagan_cli"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sagan_cli":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                is_module = (ROOT / child.replace(".", "/")).is_dir() or (ROOT / (child.replace(".", "/") + ".py")).is_file()
                found.append(Import(module, child, ()) if is_module else Import(module, node.module, (alias.name,)))
    return found


def all_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path)]


def package_edges(imports: list[Import]) -> Counter[tuple[str, str]]:
    edges: Counter[tuple[str, str]] = Counter()
    for imp in imports:
        source, target = package_of(imp.module), package_of(imp.target)
        if source != target:
            edges[source, target] += 1
    return edges


def find_cycle(edges: Counter[tuple[str, str]]) -> list[str] | None:
    """One cycle among the packages (the nodes in order, first repeated at the end), or None."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt, path + [node]):
                return cycle
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node, []))), None)


def problems(imports: list[Import]) -> list[str]:
    """What the layout forbids, one line each; empty when the layout holds."""
    found = []
    edges = package_edges(imports)
    if cycle := find_cycle(edges):
        found.append("cycle: " + " -> ".join(cycle))
    found += [f"{s} imports the command line" for s, t in edges if t == COMMAND_LINE and s != "main"]
    found += [f"{s} imports the old-path shims" for s, t in edges if t == "shims"]
    found += [f"core imports {t}" for s, t in edges if s == "core"]
    for imp in imports:
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private and package_of(imp.module) != package_of(imp.target):
            found.append(f"{imp.module} imports private {', '.join(private)} from {imp.target}")
    return found


def longest_functions(top: int) -> list[tuple[int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((node.end_lineno - node.lineno + 1, f"{module_name(path)}.{node.name}"))
    return sorted(found, reverse=True)[:top]


def longest_modules(top: int) -> list[tuple[int, str]]:
    found = [(len(p.read_text(encoding="utf-8").splitlines()), module_name(p)) for p in PACKAGE.rglob("*.py")]
    return sorted(found, reverse=True)[:top]


def main() -> None:
    imports = all_imports()
    print("package imports (from -> to: names imported):")
    for (source, target), count in sorted(package_edges(imports).items()):
        print(f"  {source:12} -> {target:12} {count}")
    print("problems:", *(problems(imports) or ["none"]), sep="\n  ")
    print("longest modules (lines):")
    for lines, name in longest_modules(8):
        print(f"  {lines:5}  {name}")
    print("longest functions (lines):")
    for lines, name in longest_functions(8):
        print(f"  {lines:5}  {name}")


if __name__ == "__main__":
    main()
