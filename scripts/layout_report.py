"""The shape of cmkit's source, measured: import cycles, imports that point up the layers, function-local imports
of cmkit's own modules, the longest functions and the share of long lines.

    python scripts/layout_report.py            # the summary (tests/test_layout.py holds the limits)
    python scripts/layout_report.py --graph    # every module's imports of cmkit modules

The layers, lowest first, are ``LAYERS`` below; a module may import from its own layer and the ones beneath it.
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cmkit"

#: cmkit's floors, lowest first: (name, module-name prefixes). The longest matching prefix decides.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "errors",
            "tensors",
            "imageio",
            "files",
            "ema",
            "distributed",
            "noise",
            "shards",
            "datasets",
            "config",
            "inputs",
        ),
    ),
    ("formats", ("formats",)),
    (
        "math",
        ("schedules", "trigflow", "solvers", "guidance", "sampling", "toy", "retime", "lpips", "distances", "jvp"),
    ),
    ("nets", ("nets",)),
    ("precond", ("precond", "discrete_vp")),
    ("losses", ("losses",)),
    ("schema", ("denoiser_config",)),
    ("models", ("load", "generate", "latent", "prompts")),
    ("libraries", ("decoder", "editing", "metrics")),
    ("training", ("training",)),
    ("serve", ("serve",)),
    ("apps", ("cli", "demo", "__main__", "")),  # "" is the package itself (cmkit/__init__.py: the public API)
]

#: Function-local imports of cmkit modules that stay function-local, and why (an optional or heavy dependency
#: behind them); every other cmkit import is at the top of its module.
ALLOWED_LOCAL: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".") or p == "") and len(p) > best:
                best, rank = len(p), i
    return rank


@dataclass
class Source:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, set[str]] = field(default_factory=dict)  # module -> cmkit modules it imports
    local: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, imported module)
    functions: list[tuple[int, str]] = field(default_factory=list)  # (lines, "path:line name")
    lines: list[str] = field(default_factory=list)


def _targets(module: str, is_pkg: bool, node: ast.stmt, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            prefix = ".".join(["cmkit"] + [b for b in base if b] + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" for a in node.names]
        names = [n for n in names if n.removeprefix("cmkit.") in known] or [prefix]
    out = set()
    for n in names:
        if n == "cmkit" or n.startswith("cmkit."):
            m = n.removeprefix("cmkit").removeprefix(".")
            while m and m not in known:
                m = m.rpartition(".")[0]
            out.add(m)
    return out


def read_source() -> Source:
    s = Source()
    for p in sorted(SRC.rglob("*.py")):
        s.modules[module_name(p)] = p
    known = set(s.modules)
    for m, p in s.modules.items():
        text = p.read_text()
        s.lines += text.splitlines()
        is_pkg = p.name == "__init__.py"
        s.imports[m] = set()

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found = _targets(m, is_pkg, child, known) - {m}
                    s.imports[m] |= found
                    if in_function and found:
                        s.local += [(m, child.lineno, t) for t in sorted(found)]
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    rel = p.relative_to(SRC.parents[1])
                    s.functions.append((child.end_lineno - child.lineno + 1, f"{rel}:{child.lineno} {child.name}"))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(text), False)
    s.functions.sort(reverse=True)
    return s


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def upward(s: Source) -> list[tuple[str, str]]:
    """(importer, imported) where the imported module lies on a higher floor than the importer."""
    return [(m, t) for m, ts in sorted(s.imports.items()) for t in sorted(ts) if layer(t) > layer(m)]


def local_imports(s: Source) -> list[tuple[str, int, str]]:
    """Function-local imports of cmkit modules not listed in ``ALLOWED_LOCAL``; one per statement."""
    seen = {(m, line) for m, line, t in s.local if f"{m}:{t}" not in ALLOWED_LOCAL}
    return [x for x in s.local if (x[0], x[1]) in seen and f"{x[0]}:{x[2]}" not in ALLOWED_LOCAL]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="print every module's cmkit imports")
    args = ap.parse_args()
    s = read_source()
    if args.graph:
        for m in sorted(s.imports):
            print(f"{m or 'cmkit'} [{LAYERS[layer(m)][0]}] -> {', '.join(sorted(s.imports[m])) or '-'}")
        return
    statements = {(m, line) for m, line, _ in local_imports(s)}
    long = sum(len(line) > 100 for line in s.lines)
    print(f"modules: {len(s.modules)}, lines: {len(s.lines)}")
    print(f"import cycles: {cycles(s.imports) or 'none'}")
    print(f"upward imports: {upward(s) or 'none'}")
    print(
        f"function-local imports of cmkit modules: {len(statements)}"
        + "".join(f"\n  {m}:{line}" for m, line in sorted(statements))
    )
    print("ten longest functions:" + "".join(f"\n  {n:4d} {where}" for n, where in s.functions[:10]))
    print(f"functions over 80 lines: {sum(n > 80 for n, _ in s.functions)}")
    print(
        f"lines over 100 characters: {long} of {len(s.lines)} ({long / len(s.lines):.1%}); over 120: "
        f"{sum(len(line) > 120 for line in s.lines)}; longest {max(map(len, s.lines))}"
    )


if __name__ == "__main__":
    main()
