"""Declared settings: one entry per key with its type, default, help and range, checked with one-line errors.

The training config (pesc.training.config) and every method's `moe:` settings (pesc.methods)
are declared this way, so a typo, a wrong type or a value out of range is always a PescError
naming the key, with a "did you mean" hint for a misspelt name.
"""

import difflib
import math
from dataclasses import dataclass
from typing import Any

from pesc.errors import PescError

ANY_NUMBER = (int, float)


@dataclass(frozen=True)
class Key:
    """One setting: accepted types (a tuple), default, a line of help, and its range (a name in BOUNDS)."""

    types: tuple
    default: Any
    help: str
    choices: tuple | None = None
    bounds: str | None = None


# Ranges a number may be declared to lie in: (test, how the error words it).
BOUNDS = {
    "positive": (lambda v: v > 0, "positive"),
    "positive-number": (lambda v: v > 0, "a positive number"),
    "non-negative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
}


def type_name(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "a mapping"}
    if types == ANY_NUMBER:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_value(where: str, value, key: Key):
    """`value` checked against `key` (YAML's `2e-4` string read as a number); None passes through."""
    if value is None:
        return None
    if float in key.types and isinstance(value, str):
        try:  # YAML 1.1 reads `2e-4` (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        raise PescError(f"{where} must be {type_name(key.types)}, got {value!r} ({type(value).__name__})")
    if key.types == ANY_NUMBER:
        value = float(value) if isinstance(value, float) else value
    if isinstance(value, float) and not math.isfinite(value):
        raise PescError(f"{where} must be a finite number, got {value!r}")
    if key.choices and value not in key.choices:
        raise PescError(f"{where} must be one of {', '.join(key.choices)}, got {value!r}")
    if key.bounds is not None:
        within, wording = BOUNDS[key.bounds]
        if not within(value):
            if key.bounds == "positive" and key.types == (int,):
                wording = "a positive integer"
            raise PescError(f"{where} must be {wording}, got {value!r}")
    return value


def unknown_key(where: str, name: str, known) -> PescError:
    """The error for a key nobody declared, with the closest declared one as a hint."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return PescError(f"unknown config key '{where}{name}'{hint}")
