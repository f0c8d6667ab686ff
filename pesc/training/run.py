"""`pesc train`: config -> data -> model -> Trainer -> run folder.

Everything that can be wrong with the user's input (config keys, types and ranges, output_dir, the base
model's config and weight files, the checkpoint to resume, dataset files and rows) is checked before the
model's weights load and before any step runs.
"""

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from pesc.atomic import nearest_existing
from pesc.checkpoint.run_files import (
    EXPERTS_FILE,
    FINAL_DIR,
    PESC_CONFIG_FILE,
    TRAIN_CONFIG_FILE,
    experts_path,
    is_training_run,
    numbered_checkpoints,
)
from pesc.checkpoint.weights import check_checkpoint_files, check_model_weights
from pesc.errors import PescError, first_line
from pesc.training.config import dump_config, load_config, to_list
from pesc.training.curves import TrainingCurvesCallback

logger = logging.getLogger("pesc.train")

# What a checkpoint-N needs to be resumed (plus the LoRA's two files where the run trains one); transformers
# writes trainer_state.json last, so a save that was interrupted leaves a folder without it.
RESUME_FILES = ("trainer_state.json", PESC_CONFIG_FILE)
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _bf16(config: dict) -> bool:
    if config["bf16"] == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(config["bf16"])


def check_launch() -> None:
    """An FSDP launch without a GPU would silently train as plain DDP: accelerate drops the FSDP plugin there."""
    from pesc.training.model import fsdp_enabled

    if fsdp_enabled() and not torch.cuda.is_available():
        raise PescError("FSDP needs GPUs (accelerate runs it only on an accelerator device): on the CPU launch "
                        "with torchrun (DDP) or DeepSpeed ZeRO-3 (`pesc recipes show accelerate/deepspeed_zero3 > "
                        "deepspeed_zero3.yaml`)")


def _device_arguments() -> dict:
    """Without a GPU, accelerate sets up multi-process training (DDP over gloo) only when told it is on the CPU,
    and then ignores DeepSpeed: a DeepSpeed launch is left on DeepSpeed's own CPU accelerator, over gloo."""
    if torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {"use_cpu": True}


def training_arguments(config: dict, has_eval: bool):
    """The transformers 5 TrainingArguments for a resolved config."""
    from transformers import TrainingArguments

    eval_steps = config["eval_steps"] or config["save_steps"]
    return TrainingArguments(
        output_dir=config["output_dir"],
        per_device_train_batch_size=config["micro_batch_size"],
        per_device_eval_batch_size=config["micro_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        num_train_epochs=config["num_epochs"],
        max_steps=config["max_steps"] if config["max_steps"] is not None else -1,
        learning_rate=config["learning_rate"],
        lr_scheduler_type=config["lr_scheduler"],
        warmup_steps=config["warmup_ratio"],  # transformers 5: a float < 1 is a fraction of the steps
        optim=config["optimizer"],
        weight_decay=config["weight_decay"],
        max_grad_norm=config["max_grad_norm"],
        bf16=_bf16(config),
        logging_strategy="steps",
        logging_steps=config["logging_steps"],
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=config["save_steps"],
        save_total_limit=config["save_total_limit"],
        report_to=config["report_to"],
        seed=config["seed"],
        data_seed=config["seed"],
        ddp_find_unused_parameters=config["ddp_find_unused_parameters"],
        dataloader_num_workers=config["dataloader_num_workers"],
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        **_device_arguments(),
        # activation checkpointing is set up on the model (non-reentrant) before peft wraps it
    )


def saved_model_config(model_config):
    """The method's config written beside each checkpoint: no quantization, cache on, as export expects."""
    from pesc.methods import method_of

    fields = model_config.to_dict()
    fields.pop("quantization_config", None)
    config = method_of(model_config).config_class.from_dict(fields)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    return config


def check_run_folder(output_dir: Path) -> None:
    """output_dir is a folder, or can become one: the missing folders are created when training starts. An existing
    folder must be empty or a pesc run (to resume, or to start over before its first checkpoint): a run writes its
    checkpoints and logs among whatever else it holds, and nothing tells the user's files from the run's."""
    if output_dir.exists() and not output_dir.is_dir():
        raise PescError(f"output_dir {output_dir} is a file: give the path of a folder")
    existing = nearest_existing(output_dir.absolute())
    if not output_dir.exists() and not existing.is_dir():
        raise PescError(f"output_dir {output_dir} cannot be created: {existing} is a file; give another path")
    if not os.access(output_dir if output_dir.exists() else existing, os.W_OK | os.X_OK):
        raise PescError(f"output_dir {output_dir} is not writable: give a folder you can write to")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not is_training_run(output_dir):
        raise PescError(f"output_dir {output_dir} holds files and is not a pesc training run: give a new or empty "
                        "folder")


def check_reporting_installed(report_to: str | list[str]) -> None:
    """Every report_to integration is installed (the Trainer would say so only after the model has loaded)."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    for name in to_list(report_to):
        if name not in ("none", "all") and name not in available:
            raise PescError(f"report_to: {name} is not installed: install it, or set report_to: none")


def resume_checkpoint(output_dir: Path, with_lora: bool = True) -> Path:
    """The newest complete checkpoint-N of the run; newer incomplete ones (an interrupted save) are skipped, by name."""
    if experts_path(output_dir / FINAL_DIR) is not None:
        raise PescError(f"--resume: {output_dir} holds no checkpoint-N to resume from (the run already finished: "
                        "see final/)")
    for checkpoint in reversed(numbered_checkpoints(output_dir)):
        required = RESUME_FILES + (LORA_FILES if with_lora else ())
        missing = [name for name in required if not (checkpoint / name).is_file()]
        missing += [EXPERTS_FILE] if experts_path(checkpoint) is None else []
        if not missing:
            try:
                check_checkpoint_files(checkpoint)
            except PescError as error:
                raise PescError(f"--resume: {error} (or remove {checkpoint} to resume from the one before)") from None
            return checkpoint
        logger.warning("--resume: skipping %s: it has no %s (its save was interrupted)", checkpoint, missing[0])
    raise PescError(f"--resume: {output_dir} holds no complete checkpoint-N to resume from")


def check_encoder_decoder_settings(config: dict, model_config) -> bool:
    """Whether the model is an encoder-decoder (T5), after refusing the settings that apply only to the other kind."""
    if not getattr(model_config, "is_encoder_decoder", False):
        if config["target_len"] is not None:
            raise PescError("target_len applies to encoder-decoder models (T5) only: remove it (sequence_len bounds "
                            "a decoder's examples)")
        return False
    if config["sample_packing"]:
        raise PescError("sample_packing: an encoder-decoder (T5) trains on padded batches of one source and one "
                        "target per row, never packed: set sample_packing: false")
    if config["lora_target_modules"]:
        raise PescError("lora_target_modules: LoRA on a T5 base is not supported yet (MoV and MoLoRA train their own "
                        "modules on the frozen base, as in the paper): set lora_target_modules: []")
    return True


@contextmanager
def process_group_destroyed_at_end():
    """Destroy the torch.distributed process group that the block (or decorated call) set up, however it ends.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they hold and abort the
    process ("terminate called without an active exception", SIGABRT) after a run that saved everything:
    the launcher then reports a failed run. A group that was up before the block (a caller's own) is left up.
    """
    available = torch.distributed.is_available()
    already_up = available and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if available and not already_up and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@process_group_destroyed_at_end()
def train(config_path: str, overrides: list[str] = (), resume: bool = False) -> Path:
    """Run (or resume) a training run; returns the run's final/ folder."""
    from transformers import AutoTokenizer, set_seed

    from pesc.data import load_training_data, make_collator
    from pesc.training.model import (
        load_base_model,
        prepare_for_training,
        register_deepspeed_leaf_modules,
        resolve_model_config,
        trainable_summary,
    )
    from pesc.methods import method_of
    from pesc.training.trainer import MoETrainer, unwrapped_model

    config = load_config(config_path, overrides)
    output_dir = Path(config["output_dir"])
    check_run_folder(output_dir)
    check_reporting_installed(config["report_to"])
    check_launch()
    checkpoint = None
    if resume:
        checkpoint = resume_checkpoint(output_dir, with_lora=bool(config["lora_target_modules"]))
    elif output_dir.exists() and any(output_dir.glob("checkpoint-*")):
        raise PescError(f"{output_dir} already holds checkpoints: pass --resume to continue, or choose another output_dir")

    model_config, _ = resolve_model_config(config)  # the base's config.json and moe:, before any data or weights load
    method = method_of(model_config)
    encoder_decoder = check_encoder_decoder_settings(config, model_config)
    try:
        check_model_weights(config["base_model"])
    except PescError as error:
        raise PescError(f"base_model: {error}") from None
    set_seed(config["seed"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"] or config["base_model"],
                                                  trust_remote_code=config["trust_remote_code"])
    except OSError as error:
        raise PescError(f"tokenizer of {config['tokenizer'] or config['base_model']!r}: {first_line(error)}") from None
    train_ds, eval_ds = load_training_data(
        config["datasets"],
        tokenizer,
        chat_template=config["chat_template"],
        sequence_len=config["sequence_len"],
        val_set_size=config["val_set_size"],
        seed=config["seed"],
        num_proc=config["dataset_num_proc"],
        max_dropped_fraction=config["max_dropped_fraction"],
        sample_fields=method.sample_fields,
        target_len=(config["target_len"] or config["sequence_len"]) if encoder_decoder else None,
    )
    args = training_arguments(config, has_eval=eval_ds is not None)  # sets up torch.distributed when launched

    model = load_base_model(config)
    model = prepare_for_training(model, config)
    register_deepspeed_leaf_modules(model, method)
    counts = trainable_summary(model, method)
    logger.info(
        "trainable parameters: LoRA %s, routers+adapters %s (of %s)",
        f"{counts['lora']:,}", f"{counts['experts']:,}", f"{counts['total']:,}",
    )
    if counts["other"]:
        raise PescError(f"{counts['other']} parameters outside LoRA and the experts would train: refusing")

    if args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / TRAIN_CONFIG_FILE).write_text(dump_config(config))
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=make_collator(tokenizer, sample_packing=config["sample_packing"],
                                    sample_fields=tuple(field.name for field in method.sample_fields),
                                    encoder_decoder=encoder_decoder),
        processing_class=tokenizer,
        model_config=saved_model_config(unwrapped_model(model).config),
        callbacks=[TrainingCurvesCallback()],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    final = output_dir / FINAL_DIR
    trainer.save_model(str(final))
    if eval_ds is not None and trainer.state.global_step % args.eval_steps:
        trainer.evaluate()  # the last step was not an eval step
    if args.should_save:
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    return final


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
