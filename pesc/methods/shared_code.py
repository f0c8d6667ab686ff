"""One copy of the shared model code for every method.

A method's shipped files import the shared model code relatively (`from .moe_config import X`), as they must inside
a checkpoint, where all files sit in one folder. In pesc the shared files live once, in pesc/modeling: this finder
answers `pesc.methods.<method>.<shared module>` with the module `pesc.modeling.<shared module>` itself, so every
method builds on the same classes (one `MoEForCausalLM`, one routing-record sink).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parent
SHARED_DIR = METHODS_DIR.parent / "modeling"


class _SharedModuleLoader(importlib.abc.Loader):
    """Loads the name by handing back the shared module, its own spec kept."""

    def __init__(self, shared_name: str):
        self.shared_name = shared_name
        self.shared_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.shared_name)
        self.shared_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.shared_spec  # the import system set the alias's spec on it; give the module its own


class SharedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `pesc.methods.<method>.<module>` in pesc/modeling when the method's folder has no such file."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) != 4 or parts[:2] != ["pesc", "methods"]:
            return None
        _, _, method, module = parts
        if (METHODS_DIR / method / f"{module}.py").exists() or not (SHARED_DIR / f"{module}.py").is_file():
            return None
        return importlib.util.spec_from_loader(fullname, _SharedModuleLoader(f"pesc.modeling.{module}"))


def install() -> None:
    """Put the finder first on the import path (once)."""
    if not any(isinstance(finder, SharedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SharedModuleFinder())
