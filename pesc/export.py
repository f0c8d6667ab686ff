"""Export a trained run as a sparse Hugging Face checkpoint in its method's layout (docs/model.md, docs/export.md).

The steps, each bounded to one copy of the model in memory (steps 1-4, "load a trained run", are
pesc.checkpoint.trained_run's; this module orchestrates them and writes the folder):

1. find the checkpoint folder (a run's `final/` or highest `checkpoint-N/`, or the folder given);
2. load the LoRA's base **unquantized** in the export dtype: a method's checkpoint as-is, a
   dense checkpoint loaded into the method's layout with the trained `pesc_config.json`
   settings;
3. put the trained added modules in (`experts.safetensors`, strict: every tensor present
   with its shape, else the base does not match the adapters);
4. wrap with peft's `PeftModel.from_pretrained` and merge as the method says (by default the
   LoRA layer by layer, each weight upcast to float32 for the addition and cast back, one
   weight at a time in float32); merging into a 4-bit model is refused;
5. write safetensors shards + index, config with `auto_map`, the method's model code files,
   tokenizer with chat template, generation config and model card into a temporary
   folder beside OUT, renamed into place at the end.
"""

import sys
from pathlib import Path

import torch

from pesc import __version__
from pesc.atomic import atomic_output_dir, check_output_dir, write_marker
from pesc.checkpoint.run_files import TRAIN_CONFIG_FILE, load_expert_state, load_trained_config, numbered_checkpoints
from pesc.checkpoint.shard_writer import ensure_sharded_layout
from pesc.checkpoint.trained_run import (
    adapter_base,
    find_checkpoint,
    load_experts,
    load_run_tokenizer,
    load_trained_model,
    read_adapter_config,
    resolve_base_config,
)
from pesc.checkpoint.weights import check_model_weights
from pesc.errors import PescError
from pesc.finite import refuse_non_finite
from pesc.methods import method_of

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _card_base_model_id(base: str, given: str | None) -> str | None:
    from pesc.model_card import hub_model_id

    if given:
        return given
    if hub_model_id(base):
        return base
    readme = Path(base) / "README.md"
    if readme.is_file():  # a PESC checkpoint made by `pesc convert` names its dense base
        from huggingface_hub import ModelCard

        try:
            named = ModelCard.load(readme, ignore_metadata_errors=True).data.base_model
        except Exception:  # noqa: BLE001 - a foreign card that does not parse names no base
            return None
        return named if isinstance(named, str) and hub_model_id(named) else None
    return None


def export(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    base: str | Path | None = None,
    base_model_id: str | None = None,
    eval_results: str | Path | None = None,
    log=None,
) -> Path:
    """Export a run folder (or checkpoint folder) to OUT; returns OUT. `eval_results` (a `pesc eval`
    results.json) puts its scores into the model card."""
    from pesc.convert import parse_size
    from pesc.evaluation.report import evaluation_section, read_results
    from pesc.model_card import build_model_card, datasets_from_train_config, read_trainer_metrics

    log = log or (lambda message: print(message, file=sys.stderr))
    if dtype not in DTYPES:
        raise PescError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    parse_size(max_shard_size)  # a bad size is named now, not after the model has loaded and merged
    out = Path(out)
    checkpoint, run_dir = find_checkpoint(source)
    base = adapter_base(checkpoint, base)
    sources = [checkpoint] + ([run_dir] if run_dir is not None else [])
    sources += [Path(base)] if Path(base).exists() else []
    check_output_dir(out, force, tuple(sources))
    trained = load_trained_config(checkpoint)
    resolve_base_config(base, trained, checkpoint)  # a base that does not match fails here, in a second
    check_model_weights(base)
    tokenizer = load_run_tokenizer(checkpoint, run_dir, base)
    evaluation = evaluation_section(read_results(eval_results)) if eval_results is not None else None

    log(f"export: checkpoint {checkpoint}")
    log(f"export: loading the base {base} unquantized ({dtype})")
    peft_model, _, _ = load_trained_model(checkpoint, base=base, dtype=torch_dtype, expert_dtype=torch_dtype)
    if hasattr(peft_model, "peft_config"):
        log("export: merging the LoRA into the dense weights (float32 addition)")
    method = method_of(peft_model.config)
    model = method.merge_for_export(peft_model)
    del peft_model
    load_experts(model, load_expert_state(checkpoint), base, checkpoint, torch_dtype)
    for param in model.parameters():
        if param.dtype != torch_dtype:
            param.data = param.data.to(torch_dtype)
    refuse_non_finite(model.state_dict().items(), f"of the merged {checkpoint}")

    config = model.config
    config.dtype = torch_dtype
    config.moe_dtype = dtype
    config.use_cache = True
    config.architectures = [method.model_class_for(config).__name__]
    config.auto_map = method.auto_map_for(config)  # AutoModel too (vLLM's Transformers backend loads it), not only what save_pretrained names
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    hub_ids, data_files = datasets_from_train_config(run_dir / TRAIN_CONFIG_FILE) if run_dir else ([], [])
    adapter_config = read_adapter_config(checkpoint)
    metrics_folders = [checkpoint] + ([run_dir] if run_dir else [])
    if run_dir is not None:
        metrics_folders += list(reversed(numbered_checkpoints(run_dir)))
    card = build_model_card(
        config,
        title=out.resolve().name,
        base_model=base,
        base_model_id=_card_base_model_id(base, base_model_id),
        datasets=hub_ids,
        data_files=data_files,
        lora=None if adapter_config is None else {
            key: adapter_config.get(key) for key in ("r", "lora_alpha", "lora_dropout", "target_modules")
        },
        metrics=read_trainer_metrics(*metrics_folders),
        evaluation=evaluation,
    )

    with atomic_output_dir(out, force) as tmp:
        log(f"export: writing {out} (shards of at most {max_shard_size})")
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        ensure_sharded_layout(tmp)
        tokenizer.save_pretrained(tmp)
        card.save(tmp / "README.md")
        write_marker(
            tmp,
            ".pesc-export",
            {"written_by": "pesc export", "pesc_version": __version__, "checkpoint": str(checkpoint), "dtype": dtype},
        )
        missing = [path.name for path in method.shipped_files if not (tmp / path.name).is_file()]
        if missing:
            raise PescError(f"the model code files were not written ({', '.join(missing)}); is the method registered?")
    log(f"export: done, {out}")
    return out
