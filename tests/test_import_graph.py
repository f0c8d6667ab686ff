"""pesc's modules import in one direction: no import circle, and the methods and the shipped model code never
import the commands built on them (convert, export, training, ...). Every import counts, lazy ones inside
functions too: a circle through a lazy import still ties the modules together."""

import ast
from pathlib import Path

import pesc
from pesc.methods.shared_code import SharedModuleFinder

PACKAGE = Path(pesc.__file__).parent
# What the methods and the model code sit below: they may not import any of these.
ABOVE_THE_METHODS = ("pesc.cli", "pesc.convert", "pesc.export", "pesc.training", "pesc.evaluation",
                     "pesc.routing_analysis", "pesc.hub", "pesc.generate", "pesc.compare", "pesc.serving",
                     "pesc.model_card", "pesc.recipe")
# A method's import of a published format is a command like convert, kept in the method's folder: it may build on
# convert (and nothing imports it but the CLI, through the registry's "module:command" strings).
IMPORTERS = ("_import", ".import_command")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the pesc modules it imports}, from the source (nothing imported)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name:
            spec = SharedModuleFinder().find_spec(name)  # a method's relative import of the shared model code
            if spec is not None:
                return spec.loader.shared_name
            if name in files:
                return name
            name = name.rpartition(".")[0]
        return None

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
        if module.startswith(("pesc.methods", "pesc.modeling")) and not module.endswith(IMPORTERS)
        for target in targets
        if target.startswith(ABOVE_THE_METHODS)
    )
    assert upward == []


def test_only_the_registry_names_a_method():
    """Outside the method folders, no module imports one: commands find methods through the registry."""
    method_folders = {path.parent.name for path in (PACKAGE / "methods").glob("*/method.py")}
    named = sorted(
        (module, target)
        for module, targets in import_graph().items()
        if not module.startswith("pesc.methods")
        for target in targets
        if target.split(".")[:3][-1] in method_folders and target.startswith("pesc.methods.")
    )
    assert named == []
