"""The package's shape, kept as built: no import cycles (deferred imports inside functions count too), stage
modules never import each other, errors.py is a leaf, the cheap verbs never import torch, no long functions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "finetune"
STAGES = ("finetune.train", "finetune.merge", "finetune.export", "finetune.evaluate")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the finetune modules it imports anywhere in its body (top level or inside a function)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # `from finetune.data import cache` imports the submodule, `import prepare` the package
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rpartition(".")[0]
                if t in mods and t != name and t != "finetune":
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color, stack = {}, []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if color.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in color:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if m not in color:
            found = visit(m)
            if found:
                return found
    return None


def _in_package_within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_no_import_cycle():
    graph = import_graph()
    # A package importing its own submodules (finetune.data -> finetune.data.prepare) and a submodule importing
    # a sibling through the package is the normal shape; a cycle through two modules that name each other isn't.
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    """The oracle itself: a two-module and a deferred-import cycle are both found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_stages_do_not_import_each_other_and_errors_is_a_leaf():
    graph = import_graph()
    for stage in STAGES:
        members = [m for m in graph if _in_package_within(m, stage)]
        for m in members:
            other = {t for t in graph[m] for s in STAGES if s != stage and _in_package_within(t, s)}
            assert not other, f"{m} imports another stage: {sorted(other)}; go through finetune.rundir"
    assert graph["finetune.errors"] == set(), f"errors.py must import nothing of ours: {graph['finetune.errors']}"
    assert graph["finetune.rundir"] <= {"finetune.errors"}, graph["finetune.rundir"]


def test_no_function_longer_than_sixty_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - start + 1
                if n > 62:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these into named steps: " + "; ".join(long)


def _imports_torch(code: str) -> bool:
    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("argv", [["--help"], ["validate", "RECIPE"], ["train", "--help"]])
def test_cheap_verbs_do_not_import_torch(argv, recipe_factory):
    argv = [str(recipe_factory()) if a == "RECIPE" else a for a in argv]
    code = ("import sys\nfrom finetune.cli import app\n"
            f"try:\n    app({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n")
    assert not _imports_torch(code), f"`finetune {' '.join(argv)}` imported torch"


def test_torch_check_sees_torch():
    """The oracle: a module that does import torch is reported."""
    assert _imports_torch("import finetune.models")
