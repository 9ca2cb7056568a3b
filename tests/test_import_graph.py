"""Which of mlcc's packages may import which, and no import cycles among its modules (read from the sources).

The layering: artifacts/ (the artifact format) at the bottom; tir_kernels/ (TIR kernels, GGUF block layouts) on it;
quant_schemes/ (weights) and model_defs/ (architectures) on tir_kernels/; compiler/ on everything but runtime/;
runtime/ on artifacts/ alone, so an artifact runs where no compiler is installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("artifacts", "tir_kernels", "quant_schemes", "model_defs", "compiler", "runtime")
OURS = {*PACKAGES, "mlcc_cli"}
ALLOWED = {
    "artifacts": set(),
    "tir_kernels": {"artifacts"},
    "quant_schemes": {"tir_kernels", "artifacts"},
    "model_defs": {"tir_kernels", "artifacts"},
    "compiler": OURS - {"compiler", "runtime"},
    "runtime": {"artifacts"},
    "mlcc_cli": OURS - {"mlcc_cli"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ours (a package by its __init__.py)."""
    found = {"mlcc_cli": ROOT / "mlcc_cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _target(module: str) -> str | None:
    """The module of ours an imported dotted name loads (a name imported from a module is that module)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Our modules `name` imports: all of them, or only those imported when it is loaded (not in functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if top_level_only:
        nodes, stack = [], list(tree.body)
        while stack:  # module-level statements, including those inside if/try blocks, not in defs
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            nodes.append(node)
            if not isinstance(node, ast.ClassDef):
                stack.extend(ast.iter_child_nodes(node))
            else:
                stack.extend(n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for imported in names:
            target = _target(imported)
            if target is not None and target != name:
                found.add(target)
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for name, path in MODULES.items():
        for target in _imports(name, path, top_level_only=False):
            if _package(target) != _package(name) and _package(target) not in ALLOWED[_package(name)]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports across the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    """Counting imports inside functions too: one there only hides a cycle until that function runs."""
    graph = {name: _imports(name, path, top_level_only=False) for name, path in MODULES.items()}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
