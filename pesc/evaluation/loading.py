"""The model object `pesc eval` hands to lm-eval: from a model folder, or from a training run as it was trained.
A decoder-only model loads as AutoModelForCausalLM, an encoder-decoder (T5, config.json's is_encoder_decoder) as
AutoModelForSeq2SeqLM.

A run (or checkpoint) loads as `pesc export` would merge it, but unmerged: base + trained experts + LoRA
(peft), so a run is evaluated without exporting first; `load_in_4bit` loads the base in 4-bit as training did.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from pesc.errors import PescError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    description: dict  # what was evaluated, for the results JSON


def source_kind(path: str | Path) -> str:
    """'folder' for a model folder (it has config.json), else 'run' (a training run or one of its checkpoints)."""
    return "folder" if (Path(path) / "config.json").is_file() else "run"


def check_eval_source(path: str | Path, trust_remote_code: bool = False) -> None:
    """PATH, a model folder or a run, is complete as far as its files tell, and loads with code the user trusts
    (nothing loaded)."""
    from pesc.checkpoint.run_files import load_trained_config
    from pesc.checkpoint.trained_run import adapter_base, find_checkpoint, resolve_base_config
    from pesc.checkpoint.weights import check_model_weights
    from pesc.generate import check_model_folder

    path = Path(path)
    if not path.exists():
        raise PescError(f"{path} does not exist: give a model folder, a training run folder or one of its checkpoints")
    if source_kind(path) == "folder":
        check_model_folder(path, trust_remote_code)
        return
    checkpoint, _ = find_checkpoint(path)
    base = adapter_base(checkpoint)
    resolve_base_config(base, load_trained_config(checkpoint), checkpoint)
    check_model_weights(base)


def _run_quantization_config(run_dir: Path | None, checkpoint: Path):
    """The 4-bit settings the run was trained with (its pesc_train_config.yaml)."""
    from pesc.checkpoint.run_files import TRAIN_CONFIG_FILE
    from pesc.training.config import load_config
    from pesc.training.model import quantization_config

    if run_dir is None:
        raise PescError(f"{checkpoint} is not inside a run folder with {TRAIN_CONFIG_FILE}: its 4-bit settings are "
                        "unknown; drop --load-in-4bit")
    return quantization_config(load_config(run_dir / TRAIN_CONFIG_FILE))


def load_source_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of PATH, a model folder or a run (checked by `check_eval_source`), without the model."""
    from pesc.checkpoint.trained_run import adapter_base, find_checkpoint, load_run_tokenizer
    from pesc.generate import load_tokenizer

    if source_kind(path) == "folder":
        return load_tokenizer(path, trust_remote_code)
    checkpoint, run_dir = find_checkpoint(path)
    return load_run_tokenizer(checkpoint, run_dir, adapter_base(checkpoint))


def load_eval_model(
    path: str | Path, *, dtype: str = "float32", load_in_4bit: bool = False, tokenizer=None,
    trust_remote_code: bool = False,
) -> EvalModel:
    """The model of PATH in eval mode, on the GPU when there is one, with its tokenizer (`tokenizer` if given)."""
    from pesc.checkpoint.trained_run import find_checkpoint, load_run_tokenizer, load_trained_model
    from pesc.generate import load_folder_model

    kind = source_kind(path)  # run_eval checked PATH already (check_eval_source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    description = {"model": str(path), "dtype": dtype}
    if kind == "folder":
        if load_in_4bit:
            raise PescError("--load-in-4bit is for training runs (their base as trained); a model folder loads as saved")
        model = load_folder_model(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code).to(device)
        tokenizer = load_source_tokenizer(path, trust_remote_code) if tokenizer is None else tokenizer
        description["kind"] = "model folder"
        return EvalModel(model, tokenizer, description)
    checkpoint, run_dir = find_checkpoint(path)
    quantization = _run_quantization_config(run_dir, checkpoint) if load_in_4bit else None
    model, checkpoint, base = load_trained_model(
        checkpoint, dtype=DTYPES[dtype], quantization_config=quantization, expert_dtype=DTYPES[dtype]
    )
    model = model.to(device)
    tokenizer = load_run_tokenizer(checkpoint, run_dir, base) if tokenizer is None else tokenizer
    description.update(kind="training checkpoint", checkpoint=str(checkpoint), base=base, load_in_4bit=load_in_4bit)
    return EvalModel(model, tokenizer, description)
