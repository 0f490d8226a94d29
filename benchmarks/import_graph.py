"""The import arrows between sokd's layers: which run up, and which modules import each other in a circle.

    python benchmarks/import_graph.py [SRC_DIR]      (default: src/sokd next to this file)

Every `import` / `from ... import` in every module counts, at any depth: function-level imports
and those under `if TYPE_CHECKING:` too (they do not run, but the module still depends on the
other's design). A module's layer comes from
LAYERS (the package's floor plan, lowest first); an arrow from a lower layer to a higher one runs
up. Circles are strongly connected sets of modules (Tarjan), counted once each.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

#: lowest first; a module belongs to the first entry naming it or a package above it
LAYERS = [
    ("ground", ["errors", "validation", "files", "table", "registry"]),
    ("models/data", ["models", "data"]),
    ("methods", ["methods"]),
    ("config", ["config"]),
    ("artifacts", ["artifacts"]),
    ("engine", ["engine"]),
    ("runner", ["runner", "export", "report", "report_dotplot", "published", "bench", "claims", "presets"]),
    ("cli", ["commands", "cli", "__main__", "__init__"]),
]


def layer_of(module: str) -> int:
    first = module.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if first in names:
            return i
    raise SystemExit(f"module '{module}' is in no layer; add it to LAYERS")


def module_name(src: Path, path: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(src: Path, path: Path, known: set[str]) -> set[str]:
    """The sokd modules `path` imports (resolved to modules that exist)."""
    tree = ast.parse(path.read_text())
    me = module_name(src, path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    if path.name == "__init__.py" and me == "__init__":
        package = []
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                stem = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "sokd":
                stem = node.module.split(".")[1:]
            else:
                continue
            targets = [".".join(stem + [a.name]) for a in node.names] + [".".join(stem)]
        elif isinstance(node, ast.Import):
            targets = [".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "sokd"]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != me:
                found.add(t)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "src" / "sokd"
    files = sorted(src.rglob("*.py"))
    known = {module_name(src, p) for p in files}
    graph = {module_name(src, p): imports_of(src, p, known) for p in files}
    # a package's __init__ re-exports its own modules: arrows from a package face into its own
    # members are not arrows between modules
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    up = sorted((m, t) for m, ts in graph.items() for t in ts if layer_of(t) > layer_of(m))
    loops = circles(graph)
    lines = {}
    for p in files:
        top = module_name(src, p).split(".")[0]
        lines[top] = lines.get(top, 0) + len(p.read_text().splitlines())
    print(f"modules: {len(files)}; lines per package / module: "
          + ", ".join(f"{k} {v}" for k, v in sorted(lines.items(), key=lambda kv: -kv[1])))
    print(f"arrows running up ({len(up)}):")
    for m, t in up:
        print(f"  {m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})")
    print(f"import circles ({len(loops)}):")
    for comp in loops:
        print("  " + " <-> ".join(comp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
