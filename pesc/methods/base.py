"""The method interface: everything the toolkit needs to know about one MoE-from-dense method.

A method is its shipped model code (a config class and a causal-LM class built on
pesc/modeling) plus one `Method` object, all in the method's folder pesc/methods/<name>/. Convert, train,
export, inspect, the model card and the CLI ask the method; none of them names one. `docs/methods.md` walks through
adding one. Importing this package imports neither torch nor transformers (the CLI lists every
method's flags before it decides what to load), so a method imports its classes where they are used.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pesc.errors import PescError
from pesc.settings import Key, check_value, unknown_key


@dataclass(frozen=True)
class Setting:
    """One setting of a method: the single source of its CLI flag (`--num-experts` from `num_experts`), its
    YAML `moe:` key, its config.json field (`config_field` where the name differs; None for a setting that is
    not stored, such as the seed), its accepted types and help.

    A config field's default and range belong to the method's config class (its `method_defaults` and
    `validate_moe_settings`, which `Method.resolve_settings` runs); only a setting that is not stored declares
    them here (`unstored_default`, `bounds`: a name in pesc.settings.BOUNDS)."""

    name: str
    types: tuple
    help: str
    config_field: str | None = ""  # "" = same name as the setting; None = not a config field
    structural: bool = False  # fixes the checkpoint's shape or function: must agree with an existing checkpoint
    unstored_default: Any = None
    bounds: str | None = None
    method: Any = dataclasses.field(default=None, repr=False, compare=False)  # set by Method: whose config it is

    @property
    def field(self) -> str | None:
        return self.name if self.config_field == "" else self.config_field

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self):
        """The config class's default of the field (imports the shipped classes: never needed to list flags)."""
        if self.field is None:
            return self.unstored_default
        config_class = self.method.config_class
        return copy.deepcopy({**config_class.common_defaults, **config_class.method_defaults}[self.field])

    def check(self, where: str, value):
        """`value` of the accepted types (and, for a setting that is not stored, in its bounds)."""
        return check_value(where, value, Key(self.types, None, self.help, None, self.bounds))


@dataclass(frozen=True)
class SampleField:
    """A per-sample value the method's losses need (LoRAMoE's `task_type`): set per dataset in the YAML or
    per row in a column; `values` maps names to the integers the model gets (None: integers as given)."""

    name: str
    values: dict | None = None
    required: bool = True
    help: str = ""

    def encode(self, value, where: str) -> int:
        """The integer the model gets for `value`, or a one-line error naming `where` and the valid values."""
        if self.values is not None and value in self.values:
            return self.values[value]
        if self.values is None and isinstance(value, int) and not isinstance(value, bool):
            return value
        valid = ", ".join(map(str, self.values)) if self.values is not None else "an integer"
        raise PescError(f"{where}: {self.name} {value!r} is not one of {valid}")


SEED = Setting("seed", (int,), "seed of the initial added modules (same seed = same tensors as `pesc convert`)",
               config_field=None, unstored_default=0, bounds="seed")


class Method:
    """The interface. A method sets the class attributes and overrides what its docstring asks."""

    name: str
    label: str  # how messages name it ("PESC")
    description: str  # one line for `pesc methods`: paper, where the experts sit, routing, aux losses
    settings: tuple[Setting, ...]
    # The shipped classes as "file.Class" in the method's own folder (pesc/methods/<name>/), imported on first use:
    # listing the methods (the CLI's flags) must not import torch. A method whose classes live elsewhere sets
    # `config_class` / `model_class` / `auto_model_class` / `zero3_leaf_modules` themselves instead.
    config_class_path: str = ""
    model_class_path: str = ""
    # the backbone without LM head (a moe_causal_lm.MoEModel): what AutoModel, and so vLLM's Transformers backend, loads
    auto_model_class_path: str = ""
    # the encoder-decoder class (a moe_seq2seq_lm.MoEForConditionalGeneration) of a method with T5 sites; "": none
    seq2seq_model_class_path: str = ""
    zero3_leaf_module_paths: tuple[str, ...] = ()  # modules DeepSpeed ZeRO-3 must gather whole (routed blocks)
    prefix: str  # the first characters of every module the method adds (PESC: "moe_adapter")
    sample_fields: tuple[SampleField, ...] = ()
    # vLLM's native model for the method's checkpoints ("module:Class"), registered by pesc's vLLM plugin; None:
    # vLLM serves it with its Transformers backend and the shipped code
    vllm_model: str | None = None
    # `pesc import NAME` subcommands: NAME -> "module:click_command", loaded only when used
    import_commands: dict[str, str] = {}
    card_tags: tuple[str, ...] = ()

    def __init__(self):
        self.settings = tuple(dataclasses.replace(setting, method=self) for setting in type(self).settings)

    @property
    def config_class(self) -> type:
        return self._shipped_class(self.config_class_path)

    @property
    def model_class(self) -> type:
        return self._shipped_class(self.model_class_path)

    @property
    def auto_model_class(self) -> type:
        return self._shipped_class(self.auto_model_class_path)

    @property
    def seq2seq_model_class(self) -> type:
        return self._shipped_class(self.seq2seq_model_class_path)

    def model_class_for(self, config) -> type:
        """The model class of `config`'s family: the causal LM, or for an encoder-decoder the seq2seq class (a
        ValueError naming the methods that have one where this method has not)."""
        if not getattr(config, "is_encoder_decoder", False):
            return self.model_class
        if not self.seq2seq_model_class_path:
            others = ", ".join(m.name for m in _registered() if m.seq2seq_model_class_path)
            raise ValueError(
                f"{self.label} cannot wrap model family {getattr(config, 'base_model_type', config.model_type)!r}: "
                f"it is an encoder-decoder, and {self.label} has decoder-only sites (methods with T5 sites: {others})"
            )
        return self.seq2seq_model_class

    def layer_prefixes(self, config) -> list[str]:
        """Where each layer's added tensors sit in the checkpoint, in the order of their seeded draws (`initial_state`
        takes a position in this list): the decoder layers, or a T5's encoder blocks then its decoder blocks."""
        if getattr(config, "is_encoder_decoder", False):
            return ([f"encoder.block.{i}." for i in range(config.num_layers)]
                    + [f"decoder.block.{i}." for i in range(config.num_decoder_layers)])
        return [f"model.layers.{i}." for i in range(config.num_hidden_layers)]

    @property
    def zero3_leaf_modules(self) -> tuple[type, ...]:
        return tuple(self._shipped_class(path) for path in self.zero3_leaf_module_paths)

    @property
    def shipped_files(self) -> list[Path]:
        """The files every checkpoint of the method carries: its classes' modules and all they import relatively."""
        from pesc.modeling.moe_causal_lm import code_files

        return code_files(self.config_class, self.model_class, self.auto_model_class)

    def _shipped_class(self, path: str) -> type:
        """The class "file.Class" of the method's package (imported now, not when the method is declared)."""
        import importlib

        module, name = path.rsplit(".", 1)
        package = type(self).__module__.rpartition(".")[0]
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    # ---- settings ----
    def all_settings(self) -> tuple[Setting, ...]:
        """The method's settings plus the seed every method's initial draw takes."""
        return (*self.settings, SEED)

    def resolve_settings(self, values: dict, where: str = "moe.") -> dict:
        """Every setting's value as the config class stores it: `values` (unknown names refused with a hint, each
        type-checked) over the config class's defaults, then `check_settings`."""
        known = {s.name: s for s in self.all_settings()}
        resolved = {name: s.default for name, s in known.items()}
        for name, value in values.items():
            if name not in known:
                raise unknown_key(where, str(name), known)
            if value is not None:
                resolved[name] = known[name].check(f"{where}{name}", value)
        return self.check_settings(resolved, where)

    def check_settings(self, values: dict, where: str = "moe.") -> dict:
        """`values` as the config class reads them (its forms: "a,b" as a list), or what the config refuses as
        a one-line PescError naming each setting as the user wrote it (`where` + name: `moe.top_k`)."""
        fields = {s.field: s for s in self.settings if s.field is not None}
        try:
            config = self.config_class(**{field: values[s.name] for field, s in fields.items()})
        except ValueError as error:
            words = {field: f"{where}{s.name}" for field, s in fields.items()}
            raise PescError(re.sub(r"\w+", lambda word: words.get(word[0], word[0]), str(error))) from None
        return {**values, **self.config_settings(config)}

    def config_from_dense(self, dense_config, values: dict, moe_dtype: str | None = None):
        """The method's config for a dense config plus resolved settings (refuses a config that is already MoE)."""
        existing = next((m for m in _registered() if m.config_class.model_type == dense_config.model_type), None)
        if existing is not None:
            raise ValueError(f"the model is already a {existing.label} model: convert a dense checkpoint instead")
        fields = dense_config.to_dict()
        fields.pop("model_type", None)
        fields.pop("architectures", None)
        dtype = fields.get("dtype")
        settings = {s.field: values[s.name] for s in self.settings if s.field is not None and s.name in values}
        config = self.config_class(
            base_model_type=dense_config.model_type,
            moe_dtype=moe_dtype or (str(dtype).removeprefix("torch.") if dtype is not None else None),
            **settings,
            **fields,
        )
        config.architectures = [self.model_class_for(config).__name__]
        config.auto_map = self.auto_map_for(config)  # save_pretrained names only the saved class; AutoModel too
        return config

    def config_settings(self, config) -> dict:
        """The settings stored in `config`, under their setting names."""
        return {s.name: getattr(config, s.field) for s in self.settings if s.field is not None}

    # ---- which parameters are the method's ----
    def is_added(self, name: str) -> bool:
        """Whether parameter / tensor `name` belongs to a module the method added (and is not peft's LoRA)."""
        return re.search(rf"(^|\.){re.escape(self.prefix)}", name) is not None and ".lora_" not in name

    def checkpoint_name(self, name: str) -> str:
        """`name` as the checkpoint spells it, whatever wraps the model (peft, DDP, modules_to_save)."""
        name = name.replace(".modules_to_save.default", "").replace(".original_module", "")
        start = name.find("model.layers.")
        return name[start:] if start >= 0 else name

    def skip_quantization(self, config) -> list[str]:
        """Module-name patterns bitsandbytes must leave in full precision (transformers matches from the start)."""
        return [rf".*{re.escape(self.prefix)}[^.]*", "lm_head"]

    def default_lora_targets(self, config) -> list[str]:
        """LoRA targets on the frozen base when the training config names none (possibly none at all)."""
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    # ---- initial values ----
    def initial_state(self, config, layer_idx: int, seed: int) -> dict[str, torch.Tensor]:
        """The seeded draw of one layer's added tensors, keyed by their names inside the decoder layer
        (`mlp.moe_adapter.router.weight`). `pesc convert --seed` writes it; training from dense uses it."""
        raise NotImplementedError

    def added_params_estimate(self, config) -> int:
        """The added parameter count at `config`'s num_experts, from two meta models with 1 and 2 experts.

        Every method's added tensors grow linearly with the experts (E adapters, an E-wide router), so the count
        extends exactly; no module per expert is built, and a huge --num-experts is sized in milliseconds
        (refused by the disk or memory check) instead of hanging while millions of modules are made."""
        import torch

        counts = []
        for experts in (1, 2):
            probe = copy.deepcopy(config)
            probe.num_experts = experts
            for setting in self.settings:
                if setting.name == "top_k" and getattr(probe, setting.field, 0) > experts:
                    setattr(probe, setting.field, experts)
            with torch.device("meta"):
                model = self.model_class_for(probe)(probe)
            counts.append(sum(p.numel() for n, p in model.named_parameters() if self.is_added(n)))
        return counts[0] + (counts[1] - counts[0]) * (config.num_experts - 1)

    # ---- what users read ----
    def parameter_summary(self, config):
        """Total, active per token and trainable parameter counts (pesc.summary.ParameterSummary)."""
        from pesc.summary import summarize_method

        return summarize_method(self, config)

    def inactive_params_per_token(self, config, added_per_layer: dict[str, int]) -> int:
        """Parameters a token does not use (sparse routing skips unselected experts; dense routing: 0)."""
        return 0

    def card_title(self, config) -> str:
        """What follows the base model's name in a converted model's card title."""
        return self.label

    def card_text(self, config, base_model: str, converted: bool = False) -> str:
        """The method's paragraph of the model card (`converted`: straight from `pesc convert`, untrained)."""
        state = " Its added modules are as `pesc convert` drew them (untrained)." if converted else ""
        return f"A {self.label} model made from the dense {base_model} with pesc: {self.description}.{state}"

    def card_rows(self, config, converted: bool = False) -> list[tuple[str, Any]]:
        """(setting, value) rows of the model card's architecture table."""
        return [(s.name, getattr(config, s.field)) for s in self.settings if s.field is not None]

    # ---- export ----
    def merge_for_export(self, peft_model):
        """The plain model to save: by default the LoRA merged into the base linears, added modules as trained."""
        from pesc.lora_merge import merge_lora

        return merge_lora(peft_model)

    # ---- derived names ----
    @property
    def auto_map(self) -> dict[str, str]:
        """config.json's auto_map: the shipped files' classes, so trust_remote_code finds them."""
        return {
            "AutoConfig": _auto_map_entry(self.config_class),
            "AutoModel": _auto_map_entry(self.auto_model_class),
            "AutoModelForCausalLM": _auto_map_entry(self.model_class),
        }

    def auto_map_for(self, config) -> dict[str, str]:
        """The auto_map of a checkpoint of `config`'s family (an encoder-decoder loads with AutoModelForSeq2SeqLM)."""
        if not getattr(config, "is_encoder_decoder", False):
            return self.auto_map
        return {"AutoConfig": _auto_map_entry(self.config_class),
                "AutoModelForSeq2SeqLM": _auto_map_entry(self.model_class_for(config))}


def _auto_map_entry(cls: type) -> str:
    """"file.Class" of a shipped class, as auto_map names it."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def check_flags(method: Method, flags: dict) -> dict:
    """The command-line flags given (not None), after refusing one that is not a setting of `method`."""
    own = {s.name for s in method.all_settings()}
    given = {name: value for name, value in flags.items() if value is not None}
    foreign = sorted(name for name in given if name not in own)
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        known = ", ".join(s.flag for s in method.all_settings())
        raise PescError(f"{flag} is not a setting of method {method.name} (its settings: {known})")
    return given


def _registered():
    from pesc.methods.registry import METHODS

    return METHODS.values()
