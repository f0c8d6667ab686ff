"""pesc's modules import in one direction: no import circle, and the methods and the shipped model code never
import the commands built on them (convert, export, training, ...). Every import counts, lazy ones inside
functions too: a circle through a lazy import still ties the modules together."""

import ast
from pathlib import Path

import pesc

PACKAGE = Path(pesc.__file__).parent
# What the methods and the model code sit below: they may not import any of these.
ABOVE_THE_METHODS = ("pesc.cli", "pesc.convert", "pesc.export", "pesc.training", "pesc.evaluation",
                     "pesc.routing_analysis", "pesc.upcycling", "pesc.camelidae", "pesc.loramoe_import", "pesc.hub",
                     "pesc.generate", "pesc.compare", "pesc.serving", "pesc.model_card", "pesc.recipe")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the pesc modules it imports}, from the source (nothing imported)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {resolve(name) for name in names if name.startswith("pesc")}
        graph[module] = targets - {None, module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_pescs_modules():
    assert circles(import_graph()) == []


def test_methods_and_model_code_import_nothing_built_on_them():
    upward = sorted(
        (module, target)
        for module, targets in import_graph().items()
        if module.startswith(("pesc.methods", "pesc.modeling"))
        for target in targets
        if target.startswith(ABOVE_THE_METHODS)
    )
    assert upward == []
