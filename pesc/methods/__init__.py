"""The registry of methods: a method is its own files plus one line here (or one `register_method` call).

See `pesc.methods.base.Method` for the interface and docs/methods.md for how to add one.
"""

from pesc.methods.base import Method, SampleField, Setting, check_flags
from pesc.methods.loramoe import LORAMOE
from pesc.methods.moelora import MOELORA
from pesc.methods.molora import MOLORA
from pesc.methods.mov import MOV
from pesc.methods.pesc import PESC
from pesc.methods.registry import (
    DEFAULT_METHOD,
    METHODS,
    get_method,
    method_for_model_type,
    method_of,
    register_method,
)

METHODS.update({method.name: method for method in (PESC, LORAMOE, MOV, MOLORA, MOELORA)})

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "SampleField", "Setting", "check_flags", "get_method", "method_for_model_type",
           "method_of", "register_method"]
