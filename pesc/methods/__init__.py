"""The methods. Each lives in its own folder, pesc/methods/<name>/, and becomes known through one
`register_method` line below (a method of your own: one `register_method` call in your code).

See `pesc.methods.base.Method` for the interface and docs/methods.md for how to add one.
"""

from pesc.methods import shared_code
from pesc.methods.base import Method, SampleField, Setting, check_flags
from pesc.methods.registry import (
    DEFAULT_METHOD,
    METHODS,
    get_method,
    method_for_model_type,
    method_of,
    register_auto_classes,
    register_method,
)

shared_code.install()

from pesc.methods.loramoe import LORAMOE  # noqa: E402 - after the shared-code finder, which their code needs
from pesc.methods.moelora import MOELORA  # noqa: E402
from pesc.methods.molora import MOLORA  # noqa: E402
from pesc.methods.mov import MOV  # noqa: E402
from pesc.methods.pesc import PESC  # noqa: E402

register_method(PESC)
register_method(LORAMOE)
register_method(MOV)
register_method(MOLORA)
register_method(MOELORA)

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "SampleField", "Setting", "check_flags", "get_method", "method_for_model_type",
           "method_of", "register_auto_classes", "register_method"]
