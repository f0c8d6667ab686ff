"""Which files hold a model's code: the modules of its classes and, recursively, every module they import relatively.

The modules are followed as loaded (through the import system), not as files beside each other: inside pesc a
method's files and the shared files they import sit in different folders; inside a checkpoint they sit together.
"""

import ast
import importlib
import shutil
from pathlib import Path


def code_files(*classes: type) -> list[Path]:
    """The source files of `classes` and of everything they import relatively, sorted by file name."""
    found, pending = {}, [cls.__module__ for cls in classes]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        module = importlib.import_module(name)
        found[name] = Path(module.__file__)
        for node in ast.walk(ast.parse(found[name].read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                pending.append(f"{module.__package__}.{node.module}")
    return sorted(set(found.values()), key=lambda path: path.name)


def save_code_files(folder, *classes: type) -> None:
    """Copy the code of `classes` into `folder`, flat, as `trust_remote_code` loads it."""
    for path in code_files(*classes):
        shutil.copyfile(path, Path(folder) / path.name)
