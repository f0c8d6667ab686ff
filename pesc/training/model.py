"""The model to train: a method's model (loaded, or upcycled in memory from a dense base) in 4-bit NF4,
with LoRA on the dense linears and the method's added modules (PESC: routers and adapters) trained in full.

Order of operations (each step checked on the real bitsandbytes path):
1. Read the base's config. A dense base plus the `method:` and `moe:` sections gives the method's
   config; the model is then loaded with `model_class.from_pretrained(dense_path, config=config)`: the
   dense tensors load (and quantize) into the method's layout, and the added modules, absent from the
   checkpoint, are then overwritten with the method's `initial_state(config, layer, seed)` -- the same
   draw as `pesc convert --seed`. (`pesc.upcycle` cannot take an already quantized model:
   `load_state_dict` rejects the packed Params4bit shapes.)
2. Quantization skips the method's `skip_quantization` patterns (its added modules and `lm_head`;
   transformers 5 matches skip patterns from the start of the module name, hence `.*moe_adapter`).
3. `prepare_model_for_kbit_training` (non-reentrant gradient checkpointing: reentrant checkpointing runs
   the layers under no_grad and the balance loss would lose its path to the routers). It upcasts every
   non-4-bit parameter -- the added modules included -- to float32: they train, and are
   saved, in float32 (4 bytes a weight, plus 4 for the gradient and 8 for AdamW's moments).
4. `get_peft_model` with LoRA on the dense linears (none where `lora_target_modules` is empty), then `requires_grad=True` on every added
   parameter (not `modules_to_save`, which would copy them).
"""

import functools
import logging
import os
import re
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from pesc.errors import PescError, first_line
from pesc.methods import get_method, method_for_model_type, method_of
from pesc.quiet import peft_deprecation_warnings_silenced

logger = logging.getLogger(__name__)


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP before the script starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def sharded_training() -> bool:
    """FSDP or ZeRO-3 flatten parameters together: they need one dtype, so no fp32 upcast of the experts."""
    return fsdp_enabled() or deepspeed_zero3_enabled()


def deepspeed_zero3_enabled() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    except ImportError:  # pragma: no cover
        return False


def resolve_model_config(config: dict):
    """(the method's config to build, whether the base is dense) from the base's config.json, `method:`
    and the `moe:` section."""
    from pesc.checkpoint.config import read_config

    try:
        base_config = read_config(config["base_model"], trust_remote_code=config["trust_remote_code"])
    except PescError as error:
        raise PescError(f"base_model: {error}") from None
    moe = config["moe"]
    method = method_for_model_type(base_config.model_type)
    if method is not None:
        if config.get("method") not in (None, method.name):
            raise PescError(f"base_model is already a {method.label} model, not {config['method']}: set method: "
                            f"{method.name}, or give a dense base_model")
        if moe:
            ours = method.config_settings(base_config)
            wanted = method.check_settings({**ours, **moe})  # as the checkpoint's config would store them
            structural = [s.name for s in method.settings if s.structural]
            wrong = [f"moe.{k}={moe[k]} (checkpoint: {ours[k]})" for k in structural if k in moe and wanted[k] != ours[k]]
            if wrong:
                raise PescError(
                    f"base_model is already a {method.label} model and the moe section disagrees with it: "
                    f"{', '.join(wrong)}; remove the moe section or give a dense base_model"
                )
            for setting in method.settings:  # what only steers training (loss weights, dropout) may change
                if setting.name in moe and not setting.structural and setting.field is not None:
                    setattr(base_config, setting.field, wanted[setting.name])
        return base_config, False
    method = get_method(config.get("method"))
    if not moe:
        raise PescError(
            f"base_model {config['base_model']!r} is a dense {base_config.model_type} model: add a moe: section "
            f"({', '.join(s.name for s in method.settings[:3])}, ...) to upcycle it, or give a {method.label} checkpoint"
        )
    try:
        model_config = method.config_from_dense(base_config, method.resolve_settings(moe))
    except ValueError as error:
        raise PescError(f"moe: {error}") from None
    check_added_modules_fit(method, model_config)
    return model_config, True


def check_added_modules_fit(method, model_config) -> None:
    """Refuse `moe:` settings whose trained modules cannot fit in this machine's memory, before any is built (a huge
    num_experts would otherwise hang making millions of modules): each added parameter trains in float32 with its
    gradient and AdamW's two moments, 16 bytes."""
    from pesc.summary import human_count

    params = method.added_params_estimate(model_config)
    if torch.cuda.is_available():
        memory, where = torch.cuda.get_device_properties(0).total_memory, "on the GPU"
    else:
        memory, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "in this machine's RAM"
    if 16 * params > memory:
        raise PescError(
            f"moe: these settings add {human_count(params)} trainable parameters ({model_config.num_experts:,} experts "
            f"per site), about {16 * params / 1e9:,.1f} GB to train (float32 weights, gradients and AdamW's moments), "
            f"more than the {memory / 1e9:,.1f} GB {where}: lower moe.num_experts or the experts' size"
        )


def quantization_config(config: dict, skip_modules: list[str] | None = None):
    """bitsandbytes' 4-bit settings; `skip_modules` (default: the config's method's) stay in full precision."""
    from transformers import BitsAndBytesConfig

    if skip_modules is None:
        skip_modules = get_method(config["method"]).skip_quantization(None)
    storage = config["bnb_4bit_quant_storage"]
    if storage is None and sharded_training():
        storage = config["torch_dtype"]  # FSDP / ZeRO-3 + QLoRA: 4-bit storage must be the dtype of the other params
        logger.info("sharded training detected: bnb_4bit_quant_storage set to %s", storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=config["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, config["bnb_4bit_compute_dtype"]),
        bnb_4bit_quant_storage=getattr(torch, storage or "uint8"),
        llm_int8_skip_modules=list(skip_modules),
    )


def _device_map():
    """Each DDP rank loads its whole model onto its own device (4-bit weights are placed at load time)."""
    if not torch.cuda.is_available() or fsdp_enabled() or deepspeed_zero3_enabled():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


@torch.no_grad()
def _reset_added_modules(model, seed: int) -> None:
    """Overwrite every added tensor with the seeded draw `pesc convert` makes."""
    method = method_of(model.config)
    for layer_idx, prefix in enumerate(method.layer_prefixes(model.config)):  # a T5's encoder blocks, then decoder's
        layer = model.get_submodule(prefix.rstrip("."))
        state = method.initial_state(model.config, layer_idx, seed)
        added = [(name, param) for name, param in layer.named_parameters() if method.is_added(name)]
        with _gathered([param for _, param in added]):
            for name, param in added:
                # the draw in the config's moe_dtype, exactly what `pesc convert` writes (upcast to fp32 later)
                param.data = state[name].to(param.device)


def _gathered(params: list[nn.Parameter]):
    """ZeRO-3 partitions parameters as the model is built: a write must go to the whole (gathered) tensor, which
    DeepSpeed then partitions again; elsewhere parameters are whole already."""
    if not deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def load_base_model(config: dict):
    """The method's model, quantized when load_in_4bit, added modules initialised (dense base) or loaded."""
    model_config, from_dense = resolve_model_config(config)
    method = method_of(model_config)
    model_config.use_cache = False
    kwargs = dict(
        config=model_config,
        dtype=getattr(torch, config["torch_dtype"]),
        attn_implementation=config["attn_implementation"],
        trust_remote_code=config["trust_remote_code"],
    )
    if config["load_in_4bit"]:
        kwargs["quantization_config"] = quantization_config(config, method.skip_quantization(model_config))
        device_map = _device_map()
        if device_map is not None:
            kwargs["device_map"] = device_map
    model_class = method.model_class_for(model_config)  # the causal LM, or a T5's seq2seq class
    try:
        with added_modules_expected_missing(method, model_class) if from_dense else nullcontext():
            model = model_class.from_pretrained(config["base_model"], **kwargs)
    except OSError as error:  # Hub messages run over several lines: keep the first
        raise PescError(f"base_model {config['base_model']!r}: {first_line(error)}") from None
    if from_dense:
        _reset_added_modules(model, config["moe"].get("seed", 0))
    check_added_unquantized(model)
    return model


@contextmanager
def added_modules_expected_missing(method, model_class):
    """A dense checkpoint has none of the added tensors (`_reset_added_modules` draws them next): transformers
    is told so, and its load report no longer lists them as MISSING, while still naming any other missing one."""
    previous = model_class._keys_to_ignore_on_load_missing
    model_class._keys_to_ignore_on_load_missing = [rf"(^|\.){re.escape(method.prefix)}"]
    try:
        yield
    finally:
        model_class._keys_to_ignore_on_load_missing = previous


def check_added_unquantized(model: nn.Module) -> None:
    """The added modules must be plain float parameters of plain (not 4-bit / 8-bit) modules."""
    method = method_of(model.config)
    for name, module in model.named_modules():
        if method.is_added(name) and type(module).__name__.startswith(("Linear4bit", "Linear8bit")):
            raise PescError(f"{name} was quantized: the method's added modules must stay in full precision")
    for name, param in model.named_parameters():
        if method.is_added(name) and (not param.is_floating_point() or type(param) is not nn.Parameter):
            raise PescError(f"{name} is not a plain float parameter ({type(param).__name__})")


def prepare_for_training(model, config: dict):
    """Gradient checkpointing, LoRA on the dense linears, added modules trainable in float32; returns the peft
    model, or the model itself where `lora_target_modules` is empty (only the added modules train)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    method = method_of(model.config)
    keep_4bit_weights_unpacked(model)
    gc_kwargs = {"use_reentrant": False}
    if config["load_in_4bit"] and not sharded_training():
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config["gradient_checkpointing"],
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if config["gradient_checkpointing"]:
            enable_activation_checkpointing(model, gc_kwargs)
            model.enable_input_require_grads()
    if not config["lora_target_modules"]:
        enable_expert_training(model, method, upcast=not sharded_training())
        return model
    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=list(config["lora_target_modules"]),
        exclude_modules=rf".*(^|\.){re.escape(method.prefix)}.*",
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with peft_deprecation_warnings_silenced():
            peft_model = get_peft_model(model, lora)
    except ValueError as error:
        raise PescError(f"lora_target_modules: {error}") from None
    # LoRA never touches the embeddings; peft's "auto" would re-read the base's config.json at every save to
    # compare vocabularies (a dense llama config read as PESC: a transformers warning per checkpoint)
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
    enable_expert_training(peft_model, method, upcast=not sharded_training())
    return peft_model


def enable_activation_checkpointing(model, kwargs: dict | None = None) -> None:
    """Gradient (activation) checkpointing under the name the installed transformers has: newer releases call it
    activation_checkpointing_enable (and deprecate the old name), older ones (5.19) have only
    gradient_checkpointing_enable."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_4bit_weights_unpacked(model: nn.Module) -> None:
    """A model that trains keeps bitsandbytes' training layout. On a CPU with AVX512-BF16, a Linear4bit repacks its
    weight for a CPU inference kernel at its first forward in eval mode without grad (the Trainer's evaluation) and
    keeps it packed: later training forwards then run that kernel, which has no backward (the gradient through the
    frozen base is lost, with only a torch warning), and under ZeRO-3 the packed tensor goes when the parameter is
    released while its packed flag stays, so the next checkpoint dies in bitsandbytes' unpacking."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def enable_expert_training(model: nn.Module, method, upcast: bool = True) -> None:
    """The added modules train in full, in float32 (unless `upcast` is False: FSDP / ZeRO-3 keep the
    model dtype, see sharded_training); everything else stays as peft left it."""
    found = 0
    for name, param in model.named_parameters():
        if method.is_added(name):
            if upcast and param.dtype != torch.float32:
                param.data = param.data.float()
            param.requires_grad_(True)
            found += 1
    if not found:
        raise PescError(f"the model has no {method.label} modules to train")


def trainable_summary(model: nn.Module, method) -> dict[str, int]:
    counts = {"lora": 0, "experts": 0, "other": 0, "total": 0}
    for name, param in model.named_parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        counts["total"] += n
        if param.requires_grad:
            counts["lora" if ".lora_" in name else "experts" if method.is_added(name) else "other"] += n
    return counts


def register_deepspeed_leaf_modules(model: nn.Module, method) -> bool:
    """ZeRO-3: gather each routed block whole, or a rank whose tokens skip an expert would wait forever."""
    if not deepspeed_zero3_enabled() or not method.zero3_leaf_modules:
        return False
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as error:  # pragma: no cover - deepspeed not installed here
        raise PescError("DeepSpeed ZeRO-3 is configured but deepspeed is not installed: pip install deepspeed") from error
    set_z3_leaf_modules(model, list(method.zero3_leaf_modules))
    return True
