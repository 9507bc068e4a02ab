"""The house rules of vhdx/, checked over the source's syntax trees (docs/architecture.md).

- Floors import only downward: cli -> ops -> chains -> file -> format; ``errors`` and
  ``_version`` serve every floor; the package root only re-exports.
- Nothing imports in a circle (module level).
- No name with a leading underscore is imported from another module.
- No import inside a function, except of an optional dependency, and the deliberate lazy
  imports of cli/: a verb module imports ops/ and chains/ (numpy, construct) only inside its
  handlers, so that ``vhdx --help`` loads none of them; the floors rule checks those imports too.
- The package root imports ``_version`` and ``errors`` only; every other public name is loaded
  at first use (``LAZY`` in vhdx/__init__.py, the same names as its TYPE_CHECKING block).
- Modules stay under about 450 lines; functions under about 60 lines and complexity 15.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vhdx"
FLOORS = {"format": 0, "file": 1, "chains": 2, "ops": 3, "cli": 4}
SHARED = {"errors", "_version"}
OPTIONAL = {"tqdm", "mfusepy", "fuse", "pytsk3", "rich", "PIL", "threadpoolctl"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_COMPLEXITY = 15


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[tuple[str, list[str], ast.AST, bool]]:
    """(target module, names, node, at module level) for every import of vhdx code."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path.name == "__init__.py", node)
            names = [a.name for a in node.names]
            out.append((target, names, node, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, [], node, id(node) in top))
    return out


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return FLOORS.get(parts[1])


def test_floors_import_only_downward():
    bad = []
    for module, path in modules().items():
        mine = floor_of(module)
        for target, names, node, _top in imports_of(module, path):
            if not target.startswith("vhdx"):
                continue
            targets = [target] + [f"{target}.{n}" for n in names if f"{target}.{n}" in modules()]
            for t in targets:
                parts = t.split(".")
                if t == "vhdx" and module != "vhdx":
                    bad.append(f"{module}:{node.lineno} imports the package root")
                if len(parts) > 1 and parts[1] in SHARED:
                    continue
                theirs = floor_of(t)
                if mine is not None and theirs is not None and theirs > mine:
                    bad.append(f"{module}:{node.lineno} imports {t} (upward)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    known = modules()
    for module, path in known.items():
        deps = set()
        for target, names, _node, top in imports_of(module, path):
            if not top or not target.startswith("vhdx"):
                continue
            for t in [target] + [f"{target}.{n}" for n in names]:
                if t in known and t != module:
                    deps.add(t)
        graph[module] = deps
    # Package __init__ modules importing their own children are not cycles of concern.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        stack.append(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                stack.pop()
                state[node] = 2
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                state[nxt] = 1
                stack.append(nxt)
                work.append((nxt, iter(sorted(graph[nxt]))))

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


# Public standard-library names that start with an underscore (os._exit: a forked child's exit).
STDLIB_UNDERSCORE = {"os._exit"}


def test_no_private_names_across_modules():
    bad = []
    for module, path in modules().items():
        for target, names, node, _top in imports_of(module, path):
            if target.startswith("vhdx") and target.split(".")[-1] != "_version":
                bad += [f"{module}:{node.lineno} imports {target}.{n}" for n in names
                        if n.startswith("_") and n != "__version__"]
        tree = ast.parse(path.read_text())
        # private names this module defines (functions, classes, attributes it assigns)
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        own |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
        own |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in own and ast.unparse(node) not in STDLIB_UNDERSCORE:
                    bad.append(f"{module}:{node.lineno} uses {ast.unparse(node)}, private to another module")
    assert not bad, "\n".join(bad)


def test_no_imports_inside_functions():
    bad = []
    for module, path in modules().items():
        for target, _names, node, top in imports_of(module, path):
            if top:
                continue
            if target.split(".")[0] in OPTIONAL or target == "__future__":
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _inside_type_checking(path, node):
                continue
            if _lazy_cli_import(module, target):
                continue
            bad.append(f"{module}:{node.lineno} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def _lazy_cli_import(module: str, target: str) -> bool:
    """A cli/ function importing a lower floor of vhdx: the lazy-import pattern of the verb handlers."""
    theirs = floor_of(target)
    return floor_of(module) == FLOORS["cli"] and theirs is not None and theirs < FLOORS["cli"]


def test_cli_imports_lower_floors_only_lazily():
    """At module level cli/ imports only the standard library, ``errors``, ``_version`` and cli/ itself.

    So ``vhdx --help`` (which imports every verb module to build its parser) loads no ops/,
    no numpy and no construct: a verb handler imports what it calls (docs/architecture.md).
    """
    bad = []
    for module, path in modules().items():
        if floor_of(module) != FLOORS["cli"]:
            continue
        for target, _names, node, top in imports_of(module, path):
            if not top:
                continue
            theirs = floor_of(target)
            if theirs is not None and theirs < FLOORS["cli"]:
                bad.append(f"{module}:{node.lineno} imports {target} at module level (import it in the handler)")
            elif target.split(".")[0] in OPTIONAL | {"numpy", "construct"}:
                bad.append(f"{module}:{node.lineno} imports {target} at module level")
    assert not bad, "\n".join(bad)


def test_the_package_root_loads_its_names_lazily():
    """vhdx/__init__.py imports only ``_version`` and ``errors``; ``LAZY`` maps every other public name
    to the module that defines it, the same names (and modules) as its TYPE_CHECKING block."""
    path = PACKAGE / "__init__.py"
    tree = ast.parse(path.read_text())
    eager = {resolve("vhdx", True, n) for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert eager <= {"__future__", "vhdx._version", "vhdx.errors", "typing", ""}, eager
    typed = {}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                typed |= {a.name: resolve("vhdx", True, imp) for a in imp.names}
    lazy = next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "LAZY")
    assert {name: f"vhdx.{where}" for name, where in lazy.items()} == typed
    assert all(floor_of(t) is not None and t in modules() for t in typed.values())


def _inside_type_checking(path: Path, target: ast.AST) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(getattr(n, "lineno", None) == getattr(target, "lineno", -1) for n in ast.walk(node)):
                return True
    return False


def complexity(fn: ast.AST) -> int:
    """McCabe's number: 1 + decisions (branches, loops, handlers, boolean operators, comprehensions)."""
    n = 1
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.If, ast.For, ast.While, ast.IfExp, ast.ExceptHandler, ast.With,
                             ast.AsyncFor, ast.Assert, ast.comprehension, ast.match_case)):
            n += 1 if not isinstance(node, ast.With) else 0
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
    return n


def functions() -> list[tuple[str, ast.AST]]:
    out = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{module}.{node.name}:{node.lineno}", node))
    return out


def test_modules_are_small():
    big = [f"{m}: {len(p.read_text().splitlines())} lines" for m, p in modules().items()
           if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    assert not big, "\n".join(big)


def test_functions_are_short_and_simple():
    bad = []
    for name, fn in functions():
        lines = fn.end_lineno - fn.lineno + 1
        if lines > MAX_FUNCTION_LINES:
            bad.append(f"{name}: {lines} lines")
        c = complexity(fn)
        if c > MAX_COMPLEXITY:
            bad.append(f"{name}: complexity {c}")
    assert not bad, "\n".join(bad)


def test_public_functions_have_docstrings():
    bad = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
            if isinstance(node, ast.ClassDef):
                targets += [n for n in node.body if isinstance(n, ast.FunctionDef)]
            for t in targets:
                if not t.name.startswith("_") and ast.get_docstring(t) is None:
                    bad.append(f"{module}.{t.name}:{t.lineno}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("checker", [complexity])
def test_the_checker_can_fail(checker):
    src = "def f(x):\n" + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(20))
    fn = ast.parse(src).body[0]
    assert checker(fn) > MAX_COMPLEXITY
