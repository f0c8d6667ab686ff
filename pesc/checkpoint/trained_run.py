"""Loading a trained run back as the model it trained: its checkpoint folder, the base it trained on
(checked against the adapters), the trained added modules put in strictly, peft's LoRA on top, and its
tokenizer. export merges what this loads; eval and routes run it unmerged.
"""

import json
from pathlib import Path

import torch

from pesc.checkpoint.run_files import (
    EXPERTS_FILE,
    PESC_CONFIG_FILE,
    TRAIN_CONFIG_FILE,
    experts_path,
    latest_checkpoint,
    load_expert_state,
    load_trained_config,
)
from pesc.checkpoint.weights import check_checkpoint_files
from pesc.errors import PescError, first_line
from pesc.methods import method_of
from pesc.quiet import peft_deprecation_warnings_silenced

ADAPTER_CONFIG = "adapter_config.json"

# Fields of the dense family that must agree between the base model and the trained adapters (and the
# method's structural settings, added per method).
_ARCH_FIELDS = (
    "base_model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None) for a run folder or a checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise PescError(f"{path} is not a folder: give a training run folder or one of its checkpoint folders")
    if experts_path(path) is not None or (path / ADAPTER_CONFIG).is_file():
        checkpoint = path
        run_dir = path.parent if (path.parent / TRAIN_CONFIG_FILE).is_file() else None
    else:
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise PescError(
                f"{path} holds no training checkpoint (no final/ or checkpoint-N/ folder with {EXPERTS_FILE}): "
                "train first, or give a checkpoint folder"
            )
        run_dir = path
    if experts_path(checkpoint) is None:
        raise PescError(f"{checkpoint} holds no {EXPERTS_FILE}: it is not a complete pesc training checkpoint")
    check_checkpoint_files(checkpoint)
    return checkpoint, run_dir


def read_adapter_config(checkpoint: Path) -> dict | None:
    """peft's adapter_config.json of the checkpoint's LoRA, or None for a run that trained no LoRA."""
    if not (checkpoint / ADAPTER_CONFIG).is_file():
        return None
    try:
        return json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise PescError(f"{checkpoint / ADAPTER_CONFIG} cannot be read ({error})") from None


def adapter_base(checkpoint: Path, base: str | Path | None = None) -> str:
    """The model the run trained on: `base` if given, else adapter_config.json's base_model_name_or_path
    (the LoRA's), else, for a run without LoRA, the path its pesc_config.json was loaded from."""
    if base is not None:
        return str(base)
    adapter_config = read_adapter_config(checkpoint)
    if adapter_config is not None:
        name, source = adapter_config.get("base_model_name_or_path"), checkpoint / ADAPTER_CONFIG
    else:
        name, source = getattr(load_trained_config(checkpoint), "_name_or_path", None), checkpoint / PESC_CONFIG_FILE
    if not name:
        raise PescError(f"{source} names no base model: pass --base with the model trained on")
    return str(name)


def _mismatch(base_config, trained, base: str, checkpoint: Path) -> PescError | None:
    method = method_of(trained)
    structural = tuple(s.field for s in method.settings if s.structural and s.field is not None)
    diffs = [
        f"{field} is {getattr(base_config, field, None)} in the base but {getattr(trained, field, None)} "
        "in the adapters"
        for field in (*_ARCH_FIELDS, *structural)
        if getattr(base_config, field, None) != getattr(trained, field, None)
    ]
    if not diffs:
        return None
    return PescError(
        f"the base model {base} does not match the adapters in {checkpoint}: {'; '.join(diffs)} "
        "(pass --base with the model the run was trained on)"
    )


def resolve_base_config(base: str, trained, checkpoint: Path):
    """The method's config the base loads with (a dense base's plus the trained settings), checked against the adapters."""
    from pesc.checkpoint.config import read_config
    from pesc.methods import method_for_model_type

    try:
        base_config = read_config(base)
    except PescError as error:
        raise PescError(f"cannot read the base model: {error}; pass --base with its local folder") from None
    if method_for_model_type(base_config.model_type) is not None:
        config = base_config
    else:
        method = method_of(trained)
        config = method.config_from_dense(base_config, method.config_settings(trained))
    error = _mismatch(config, trained, base, checkpoint)
    if error is not None:
        raise error
    return config


def load_base_model(base: str, trained, checkpoint: Path, dtype: torch.dtype, quantization_config=None):
    """The LoRA's base as the method's model, built on meta and loaded once (as the trainer loads it).

    A dense base loads into the method's layout with the trained settings; its added modules (absent
    from the dense checkpoint) are placeholders until `load_experts` puts the trained ones in.
    """
    config = resolve_base_config(base, trained, checkpoint)
    kwargs = {"dtype": dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the experts as MISSING: expected, they load next
    try:
        model = method_of(config).model_class_for(config).from_pretrained(base, config=config, **kwargs)
    except (RuntimeError, ValueError) as error:
        first = first_line(error)
        raise PescError(f"cannot load the base model {base} ({first})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def load_experts(
    model: torch.nn.Module, state: dict[str, torch.Tensor], base: str, checkpoint: Path, dtype: torch.dtype | None
) -> None:
    """Put the trained added modules in, strictly: the same names and shapes, else a PescError.

    `dtype` None keeps the stored dtype (the trained model as it ran); else tensors are cast.
    """
    method = method_of(model.config)
    params = {
        method.checkpoint_name(name): param
        for name, param in model.named_parameters()
        if method.is_added(name) and ".original_module" not in name
    }
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    shapes = [
        f"{name} is {list(state[name].shape)} in the adapters but {list(param.shape)} in the base"
        for name, param in params.items()
        if name in state and state[name].shape != param.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} expert tensors of the base are missing from {EXPERTS_FILE} ({missing[0]}, ...)")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in {EXPERTS_FILE} have no place in the base ({unexpected[0]}, ...)")
    if shapes:
        problems.append(shapes[0])
    if problems:
        raise PescError(f"the base model {base} does not match the adapters in {checkpoint}: {'; '.join(problems)}")
    with torch.no_grad():
        for name, param in params.items():
            param.data = state[name].to(device=param.device, dtype=dtype or state[name].dtype)


def load_trained_model(
    checkpoint: str | Path,
    *,
    base: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    quantization_config=None,
    expert_dtype: torch.dtype | None = None,
):
    """The trained model as peft runs it (LoRA unmerged): base (unquantized, or 4-bit with a
    `BitsAndBytesConfig`) + trained experts + LoRA. Returns (peft model, checkpoint folder, base name);
    for a run that trained no LoRA, the model itself in place of the peft model."""
    from peft import PeftModel

    checkpoint, _ = find_checkpoint(checkpoint)
    trained = load_trained_config(checkpoint)
    base = adapter_base(checkpoint, base)
    model = load_base_model(base, trained, checkpoint, dtype, quantization_config)
    load_experts(model, load_expert_state(checkpoint), base, checkpoint, expert_dtype)
    if read_adapter_config(checkpoint) is None:
        return model.eval(), checkpoint, base
    try:
        with peft_deprecation_warnings_silenced():
            peft_model = PeftModel.from_pretrained(model, checkpoint, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as error:
        first = first_line(error)
        raise PescError(f"the base model {base} does not match the LoRA in {checkpoint}: {first}") from None
    return peft_model.eval(), checkpoint, base


def _tokenizer_source(folders: list[str | Path | None]) -> str | None:
    for folder in folders:
        if folder is not None and any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
            return str(folder)
    return None


def load_run_tokenizer(checkpoint: Path, run_dir: Path | None, base: str):
    from transformers import AutoTokenizer

    source = _tokenizer_source([checkpoint, run_dir, base if Path(base).exists() else None])
    source = source or (None if Path(base).exists() else base)
    if source is None:
        raise PescError(f"no tokenizer found in {checkpoint}, the run folder or the base model {base}")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)  # no code from a run's folders
    except (OSError, ValueError) as error:
        raise PescError(f"cannot load the tokenizer from {source} ({error})") from None
