"""The registry of methods: a method is its own files plus one line here (or one `register_method` call).

See `pesc.methods.base.Method` for the interface and docs/methods.md for how to add one.
"""

import difflib

from pesc.errors import PescError
from pesc.methods.base import Method, SampleField, Setting, check_flags
from pesc.methods.loramoe import LORAMOE
from pesc.methods.moelora import MOELORA
from pesc.methods.molora import MOLORA
from pesc.methods.mov import MOV
from pesc.methods.pesc import PESC

DEFAULT_METHOD = "pesc"
METHODS: dict[str, Method] = {method.name: method for method in (PESC, LORAMOE, MOV, MOLORA, MOELORA)}


def register_method(method: Method) -> Method:
    """Make `method` known to every command (and its config class known to transformers' Auto* factories)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    METHODS[method.name] = method
    AutoConfig.register(method.config_class.model_type, method.config_class, exist_ok=True)
    AutoModel.register(method.config_class, method.auto_model_class, exist_ok=True)
    AutoModelForCausalLM.register(method.config_class, method.model_class, exist_ok=True)
    method.config_class.register_for_auto_class()
    method.auto_model_class.register_for_auto_class("AutoModel")
    method.model_class.register_for_auto_class("AutoModelForCausalLM")
    return method



def get_method(name: str | None) -> Method:
    """The method called `name` (None: the default), or a one-line error with the closest name."""
    name = DEFAULT_METHOD if name is None else name
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), list(METHODS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(METHODS)}"
    raise PescError(f"unknown method {name!r} ({hint}; `pesc methods` lists them)")


def method_for_model_type(model_type: str | None) -> Method | None:
    """The method whose checkpoints have this config.json model_type, or None (a dense model)."""
    return next((m for m in METHODS.values() if m.config_class.model_type == model_type), None)


def method_of(config) -> Method:
    """The method of a loaded config (one of the registered methods' config classes)."""
    method = method_for_model_type(getattr(config, "model_type", None))
    if method is None:
        raise PescError(f"a {getattr(config, 'model_type', None)} config belongs to no registered method")
    return method


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "SampleField", "Setting", "check_flags", "get_method", "method_for_model_type",
           "method_of", "register_method"]
