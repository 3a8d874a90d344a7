"""The import graph of shardify/ and trainer/: no cycle, no module named like the stdlib, and
the trainer reaches only the shard contract's side of shardify.

The graph is read from the source with `ast` (nothing is imported), and it counts every import
statement, also those inside functions: a lazy import that closes a cycle works only while
nobody moves the import, which is how the old format.py <-> tokenize.py cycle went unnoticed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shardify", "trainer")
# What the trainer may import of shardify, directly or through them: the shard contract
# (docs/format.md) and the leaf modules it needs. Reading shards never pulls in the writer.
CONTRACT = {"shardify", "shardify.format", "shardify.jpeg", "shardify.tokenization", "shardify.text",
            "shardify.records", "shardify.checksum"}


def module_files(root: Path, packages) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the packages under root."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node, name: str, is_package: bool, known) -> list[str]:
    """The modules of `known` that one import statement of module `name` names."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: from the module's package, `level - 1` packages up
            package = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = ".".join(p for p in (package, node.module) if p)
        else:
            base = node.module or ""
        # `from pkg import mod` names the module pkg.mod; `from mod import name` names mod
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    out = []
    for target in targets:
        while target and target not in known:  # `import a.b.c` of a module we do not have: its package
            target = target.rpartition(".")[0]
        if target:
            out.append(target)
    return out


def import_graph(root: Path, packages) -> dict[str, set[str]]:
    """{module: the modules of the packages it imports}, from every import statement in it."""
    files = module_files(root, packages)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(node, name, path.name == "__init__.py", files))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reachable(graph: dict[str, set[str]], start) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_no_import_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 50 and graph["shardify.cli"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_cycles_and_lazy_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, and a relative one."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub.c import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nimport json\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("import json\nx = 1\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None


def test_no_module_shadows_the_standard_library():
    """`python shardify/cli/__init__.py` puts that folder first on sys.path: a module there named
    like a stdlib one (the old shardify/tokenize.py) breaks every import of the real one."""
    clashes = [name for name in module_files(ROOT, PACKAGES) if name.rpartition(".")[2] in sys.stdlib_module_names]
    assert clashes == []


def test_the_trainer_imports_only_the_shard_contract_of_shardify():
    graph = import_graph(ROOT, PACKAGES)
    trainer_side = {n for n in graph if n.startswith("trainer")}
    used = {m for m in reachable(graph, trainer_side) if m.startswith("shardify")}
    assert "shardify.format" in used
    assert used <= CONTRACT, f"the trainer pulls in {sorted(used - CONTRACT)} of shardify"


def test_every_folder_of_modules_is_a_package():
    """setuptools' find_packages (pyproject.toml) installs only folders with an __init__.py: a
    folder of modules without one works from a checkout and is missing after `pip install`."""
    folders = {path.parent for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []
