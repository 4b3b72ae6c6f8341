"""The package's shape: no module imports another's private names, and the import graph has no cycle (imports
inside functions count too: a lazy import hides a cycle from Python, not from the design)."""
import ast
from pathlib import Path

import pathfactor

ROOT = Path(pathfactor.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, [names]) for every import statement of ``path``, relative imports resolved."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [alias.name for alias in node.names]


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for module, names in _imports(path):
            if not module.startswith("pathfactor"):
                continue
            for imported in names or [""]:  # `from pkg import submodule` depends on the submodule
                full = f"{module}.{imported}" if imported else module
                deps.add(full if full in MODULES else module)
        deps.discard(name)
        graph[name] = {d for d in deps if d in MODULES and d != "pathfactor"}
    return graph


def test_no_private_names_are_imported_across_modules():
    offences = []
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if module.startswith("pathfactor") and module != name:
                offences += [f"{name} imports {n} from {module}" for n in names if n.startswith("_")
                             and not n.startswith("__") and f"{module}.{n}" not in MODULES]  # a module is fine
    assert not offences, "\n".join(offences)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
