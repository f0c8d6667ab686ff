"""The one list of methods, and the lookups every command uses. It imports no method (the package
`pesc.methods` registers the built-in ones, one line each), so a method's own modules may look the registry up
without an import circle."""

import difflib

from pesc.errors import PescError

DEFAULT_METHOD = "pesc"
METHODS: dict = {}  # name -> pesc.methods.base.Method, in registration order (the built-in ones first)


def register_method(method):
    """Make `method` known to every command: the one registration of a method (built-in ones too). Its classes
    reach transformers' Auto* factories when `register_auto_classes` runs (commands that load models call it)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def register_auto_classes() -> None:
    """Register every method's config and model classes with the Auto* factories, so `AutoModelForCausalLM.
    from_pretrained` (`AutoModelForSeq2SeqLM` for a T5 one) loads a checkpoint of any method with the installed
    pesc's code (no remote code)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for method in METHODS.values():
        AutoConfig.register(method.config_class.model_type, method.config_class, exist_ok=True)
        AutoModel.register(method.config_class, method.auto_model_class, exist_ok=True)
        AutoModelForCausalLM.register(method.config_class, method.model_class, exist_ok=True)
        if method.seq2seq_model_class_path:
            AutoModelForSeq2SeqLM.register(method.config_class, method.seq2seq_model_class, exist_ok=True)


def get_method(name: str | None):
    """The method called `name` (None: the default), or a one-line error with the closest name."""
    name = DEFAULT_METHOD if name is None else name
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), list(METHODS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(METHODS)}"
    raise PescError(f"unknown method {name!r} ({hint}; `pesc methods` lists them)")


def method_for_model_type(model_type: str | None):
    """The method whose checkpoints have this config.json model_type, or None (a dense model)."""
    return next((m for m in METHODS.values() if m.config_class.model_type == model_type), None)


def method_of(config):
    """The method of a loaded config (one of the registered methods' config classes)."""
    method = method_for_model_type(getattr(config, "model_type", None))
    if method is None:
        raise PescError(f"a {getattr(config, 'model_type', None)} config belongs to no registered method")
    return method
