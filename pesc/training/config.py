"""The training config: one YAML file in the axolotl style, checked in full before anything loads.

Every key is declared below with its type, default and range; an unknown key (a typo), a value of the
wrong type or out of range (a negative or NaN learning rate) is a PescError naming the key, so a misspelt
setting is never silently ignored and nothing the model does not need to know fails after it has loaded.
`--set a.b=value` overrides are parsed as YAML scalars and checked the same way.
"""

import copy
import difflib
from pathlib import Path

import yaml

from pesc.errors import PescError
from pesc.settings import ANY_NUMBER as _ANY_NUMBER, Key, check_value as _check_value, unknown_key as _unknown

SCHEMA: dict[str, Key] = {
    # model
    "base_model": Key((str,), None, "local folder or Hub id of a dense causal LM or a method's checkpoint (required)"),
    "method": Key((str,), None, "the method a dense base_model becomes (default pesc; `pesc methods` lists them)"),
    "moe": Key((dict,), None, "the method's settings, used to upcycle a dense base_model in memory"),
    "tokenizer": Key((str,), None, "tokenizer folder or Hub id (default: base_model)"),
    "trust_remote_code": Key((bool,), False, "allow model code from the Hub"),
    "load_in_4bit": Key((bool,), True, "QLoRA: load the base in 4-bit NF4"),
    "bnb_4bit_quant_type": Key((str,), "nf4", "4-bit data type", ("nf4", "fp4")),
    "bnb_4bit_use_double_quant": Key((bool,), True, "quantize the quantization constants too"),
    "bnb_4bit_compute_dtype": Key((str,), "bfloat16", "dtype of the 4-bit matmuls", ("bfloat16", "float16", "float32")),
    "bnb_4bit_quant_storage": Key((str,), None, "storage dtype of 4-bit weights (FSDP: the model dtype; set automatically)"),
    "torch_dtype": Key((str,), "bfloat16", "dtype of the non-quantized base weights", ("bfloat16", "float16", "float32")),
    "attn_implementation": Key((str,), "sdpa", "attention kernel (sdpa, eager, flash_attention_2, ...)"),
    # LoRA
    "lora_r": Key((int,), 64, "LoRA rank", bounds="positive"),
    "lora_alpha": Key(_ANY_NUMBER, 16, "LoRA alpha", bounds="positive"),
    "lora_dropout": Key(_ANY_NUMBER, 0.1, "LoRA dropout", bounds="fraction"),
    "lora_target_modules": Key(
        (list,), None, "dense linears that get a LoRA (default: the method's; PESC: every attention and FFN linear)",
    ),
    # data
    "datasets": Key((list,), None, "list of {path, type, split?, name?, data_files?, field?, *_field?} (required)"),
    "chat_template": Key((str,), None, "camelidae, chatml, a Jinja string, or unset for the tokenizer's own"),
    "sequence_len": Key((int,), 2048, "maximum tokens per example (longer ones are truncated; T5: per source)",
                        bounds="positive"),
    "target_len": Key((int,), None, "encoder-decoder (T5) only: maximum target tokens, EOS included "
                      "(default: sequence_len)", bounds="positive"),
    "max_dropped_fraction": Key(
        _ANY_NUMBER, 0.1, "largest share of rows sequence_len may drop (their prompt fills it); 1 allows any",
        bounds="share",
    ),
    "sample_packing": Key((bool,), False, "padding-free packed batches, no attention across packed examples"),
    "val_set_size": Key(_ANY_NUMBER, 0.0, "held-out rows: a fraction in (0, 1) or a row count; 0 for none",
                        bounds="non-negative"),
    "dataset_num_proc": Key((int,), None, "processes for tokenization", bounds="positive"),
    # optimisation
    "micro_batch_size": Key((int,), 1, "examples per device per forward pass", bounds="positive"),
    "gradient_accumulation_steps": Key((int,), 1, "micro batches per optimizer step", bounds="positive"),
    "num_epochs": Key(_ANY_NUMBER, 1, "passes over the data (max_steps wins when set)", bounds="positive"),
    "max_steps": Key((int,), None, "stop after this many optimizer steps", bounds="positive"),
    "learning_rate": Key(_ANY_NUMBER, 2e-4, "peak learning rate", bounds="positive"),
    "lr_scheduler": Key((str,), "constant_with_warmup", "transformers scheduler name (constant_with_warmup, cosine, linear...)"),
    "warmup_ratio": Key(_ANY_NUMBER, 0.03, "fraction of the steps spent warming up", bounds="fraction"),
    "optimizer": Key((str,), "adamw_torch", "transformers optim name (adamw_torch, paged_adamw_32bit, ...)"),
    "weight_decay": Key(_ANY_NUMBER, 0.0, "weight decay", bounds="non-negative"),
    "max_grad_norm": Key(_ANY_NUMBER, 0.3, "gradient clipping norm (0: no clipping)", bounds="non-negative"),
    "gradient_checkpointing": Key((bool,), True, "recompute activations in backward (always non-reentrant)"),
    "bf16": Key((bool, str), "auto", "bf16 autocast: true, false or auto (on when the GPU supports it)"),
    # run
    "output_dir": Key((str,), None, "run folder: checkpoints, final/, logs, resolved config (required)"),
    "seed": Key((int,), 0, "seed of data order, dropout and LoRA init", bounds="seed"),
    "logging_steps": Key((int,), 10, "log loss, aux loss, lr and expert load every N steps", bounds="positive"),
    "eval_steps": Key((int,), None, "evaluate every N steps (needs val_set_size; default: at each save)",
                      bounds="positive"),
    "save_steps": Key((int,), 500, "checkpoint every N steps", bounds="positive"),
    "save_total_limit": Key((int,), None, "keep at most N checkpoints", bounds="positive"),
    "report_to": Key((str, list), "none", "tensorboard, wandb, ... or none"),
    "ddp_find_unused_parameters": Key((bool,), False, "DDP: every expert runs on every step, so false is right"),
    "dataloader_num_workers": Key((int,), 0, "data loader worker processes", bounds="non-negative"),
}

REQUIRED = ("base_model", "datasets", "output_dir")


def validate(raw: dict) -> dict:
    """The resolved config: every key present (defaults filled in), types checked, cross-key rules applied."""
    if not isinstance(raw, dict):
        raise PescError("the training config must be a YAML mapping of key: value")
    config = {}
    for name, value in raw.items():
        if name not in SCHEMA:
            raise _unknown("", str(name), SCHEMA)
        config[name] = _check_value(name, value, SCHEMA[name])
    for name, key in SCHEMA.items():
        if config.get(name) is None:
            config[name] = copy.deepcopy(key.default)
    for name in REQUIRED:
        if config[name] in (None, "", []):
            raise PescError(f"the config needs '{name}'")

    from pesc.methods import get_method

    method = get_method(config["method"])  # unset: pesc, or the method of a method's checkpoint given as base
    if config["moe"] is not None:
        method.resolve_settings(config["moe"])  # refuses, in one line, what the method's config class refuses
        # kept as written (type-checked): what `top_k: 0` means depends on num_experts, which a checkpoint given as
        # base_model fixes (pesc.training.model.resolve_model_config normalises against it)
        known = {s.name: s for s in method.all_settings()}
        config["moe"] = {k: known[k].check(f"moe.{k}", v) for k, v in config["moe"].items() if v is not None}

    if raw.get("lora_target_modules") is None:
        config["lora_target_modules"] = method.default_lora_targets(None)
    elif not all(isinstance(m, str) and m for m in config["lora_target_modules"]):
        raise PescError("lora_target_modules must be a list of module names ([] trains no LoRA: only the added modules)")
    if config["bf16"] not in (True, False, "auto"):
        raise PescError(f"bf16 must be true, false or auto, got {config['bf16']!r}")
    if isinstance(config["report_to"], list) and not all(isinstance(r, str) for r in config["report_to"]):
        raise PescError("report_to must be a string or a list of strings")
    _check_transformers_names(config)
    _check_datasets(config["datasets"], method.sample_fields)
    return config


def _check_transformers_names(config: dict) -> None:
    """lr_scheduler, optimizer and report_to name things transformers has (it would say so only later)."""
    from transformers.integrations import get_reporting_integration_callbacks
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for name, names in (("lr_scheduler", SchedulerType), ("optimizer", OptimizerNames)):
        valid = [member.value for member in names]
        if config[name] not in valid:
            raise _unknown_value(name, config[name], valid)
    report_to = config["report_to"]
    try:
        get_reporting_integration_callbacks([name for name in to_list(report_to) if name not in ("none", "all")])
    except ValueError:
        known = "e.g. tensorboard, wandb, none"
        raise PescError(f"report_to: unknown integration in {report_to!r} ({known})") from None


def to_list(value: str | list[str]) -> list[str]:
    """A setting that takes one name or a list of names, as a list."""
    return [value] if isinstance(value, str) else list(value)


def _unknown_value(name: str, value: str, valid: list[str]) -> PescError:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"
    return PescError(f"{name} {value!r} is not one transformers knows ({hint})")


def _check_datasets(entries: list, sample_fields=()) -> None:
    """Entry keys and types, column mappings included (the data pipeline checks files and rows on loading)."""
    from pesc.data import DATASET_KEYS, DATASET_TYPES, check_dataset_entry

    for i, entry in enumerate(entries):
        where = f"datasets[{i}]"
        if not isinstance(entry, dict):
            raise PescError(f"{where} must be a mapping with 'path' and 'type', got {entry!r}")
        known = (*DATASET_KEYS, *(field.name for field in sample_fields))
        for name in entry:
            if name not in known:
                raise _unknown(f"{where}.", str(name), known)
        for name in ("path", "type"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise PescError(f"{where}.{name} must be a non-empty string")
        if entry["type"] not in DATASET_TYPES:
            raise PescError(f"{where}.type must be one of {', '.join(DATASET_TYPES)}, got {entry['type']!r}")
        check_dataset_entry(i, entry, sample_fields)  # value types, and column keys that do not apply to the entry's type


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key=value` or `a.b=value` settings (values parsed as YAML) laid over the file's mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise PescError(f"--set {item!r}: expected key=value")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise PescError(f"--set {dotted}: cannot parse {text!r} as a YAML value ({_yaml_problem(error)})") from None
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise PescError(f"--set {dotted}: '{part}' is not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read, override and validate a training config: a YAML file, or a shipped recipe's name (pesc.recipe)."""
    from pesc.recipe import recipe_file

    path = recipe_file(path, "training config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PescError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    return validate(apply_overrides(raw, list(overrides)))


def _yaml_problem(error: Exception) -> str:
    """One line for a YAML error: the problem and where (PyYAML's own message runs over several lines)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    return " ".join(f"{problem}{where}".split())


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
