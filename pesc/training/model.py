"""The model to train: a PESC model (loaded, or upcycled in memory from a dense base) in 4-bit NF4,
with LoRA on the dense linears and the routers and expert adapters trained in full.

Order of operations (each step checked on the real bitsandbytes path):
1. Read the base's config. A dense base plus a `moe:` section gives a PescConfig; the model is then
   loaded with `PescForCausalLM.from_pretrained(dense_path, config=pesc_config)`: the dense tensors load
   (and quantize) into the PESC layout, and the experts, absent from the checkpoint, are then overwritten
   with `initial_expert_state(config, layer, seed)` -- the same draw as `pesc convert --seed`.
   (`pesc.upcycle` cannot take an already quantized model: `load_state_dict` rejects the packed
   Params4bit shapes.)
2. Quantization skips every module under `moe_adapter` and `lm_head` (transformers 5 matches skip
   patterns from the start of the module name, hence the `.*moe_adapter` regex).
3. `prepare_model_for_kbit_training` (non-reentrant gradient checkpointing: reentrant checkpointing runs
   the layers under no_grad and the balance loss would lose its path to the routers). It upcasts every
   non-4-bit parameter -- routers and adapters included -- to float32: the experts train, and are
   saved, in float32 (4 bytes a weight, plus 4 for the gradient and 8 for AdamW's moments).
4. `get_peft_model` with LoRA on the dense linears, then `requires_grad=True` on every router and
   adapter parameter (not `modules_to_save`, which would copy them).
"""

import functools
import logging
import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from pesc.errors import PescError, first_line
from pesc.modeling import PescConfig, PescForCausalLM, PescMoEAdapter
from pesc.quiet import peft_deprecation_warnings_silenced
from pesc.training.config import MOE_STRUCTURE_KEYS

logger = logging.getLogger(__name__)

QUANT_SKIP_MODULES = [".*moe_adapter", "lm_head"]
_MOE_PARAM_MARK = ".moe_adapter."


def is_moe_parameter(name: str) -> bool:
    return _MOE_PARAM_MARK in name and ".lora_" not in name


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


def resolve_pesc_config(config: dict):
    """(PescConfig to build, whether the base is dense) from the base's config.json and the `moe:` section."""
    from pesc.checkpoint import read_config
    from pesc.upcycling import pesc_config_from_dense

    try:
        base_config = read_config(config["base_model"], trust_remote_code=config["trust_remote_code"])
    except PescError as error:
        raise PescError(f"base_model: {error}") from None
    moe = config["moe"]
    if isinstance(base_config, PescConfig):
        if moe:
            ours = {"num_experts": base_config.num_experts, "top_k": base_config.topk,
                    "adapter_dim": base_config.adapter_dim, "moe_scaling": base_config.moe_scaling}
            wrong = [f"moe.{k}={moe[k]} (checkpoint: {ours[k]})" for k in MOE_STRUCTURE_KEYS if k in moe and moe[k] != ours[k]]
            if wrong:
                raise PescError(
                    f"base_model is already a PESC model and the moe section disagrees with it: {', '.join(wrong)}; "
                    "remove the moe section or give a dense base_model"
                )
            if "router_aux_loss_coef" in moe:
                base_config.router_aux_loss_coef = moe["router_aux_loss_coef"]
            if "adapter_dropout" in moe:
                base_config.adapter_dropout = moe["adapter_dropout"]
        return base_config, False
    if not moe:
        raise PescError(
            f"base_model {config['base_model']!r} is a dense {base_config.model_type} model: add a moe: section "
            "(num_experts, top_k, adapter_dim, ...) to upcycle it, or give a PESC checkpoint"
        )
    try:
        pesc_config = pesc_config_from_dense(
            base_config,
            num_experts=moe.get("num_experts", 8),
            top_k=moe.get("top_k", 2),
            adapter_dim=moe.get("adapter_dim", 512),
            moe_scaling=moe.get("moe_scaling", 0.25),
            adapter_dropout=moe.get("adapter_dropout", 0.1),
            router_aux_loss_coef=moe.get("router_aux_loss_coef", 0.01),
        )
    except ValueError as error:
        raise PescError(f"moe: {error}") from None
    return pesc_config, True


def quantization_config(config: dict):
    from transformers import BitsAndBytesConfig

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
        llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
    )


def _device_map():
    """Each DDP rank loads its whole model onto its own device (4-bit weights are placed at load time)."""
    if not torch.cuda.is_available() or fsdp_enabled() or deepspeed_zero3_enabled():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


@torch.no_grad()
def _reset_experts(model: PescForCausalLM, seed: int) -> None:
    """Overwrite every router and adapter with the seeded draw `pesc convert` makes."""
    from pesc.upcycling import initial_expert_state

    for layer_idx, layer in enumerate(model.model.layers):
        block = layer.mlp.moe_adapter
        state = initial_expert_state(model.config, layer_idx, seed)
        with _gathered(list(block.parameters())):
            for name, param in block.named_parameters():
                # the draw in the config's moe_dtype, exactly what `pesc convert` writes (upcast to fp32 later)
                param.data = state[name].to(param.device)


def _gathered(params: list[nn.Parameter]):
    """ZeRO-3 partitions parameters as the model is built: a write must go to the whole (gathered) tensor, which
    DeepSpeed then partitions again; elsewhere parameters are whole already."""
    if not deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def load_base_model(config: dict) -> PescForCausalLM:
    """The PESC model, quantized when load_in_4bit, experts initialised (dense base) or loaded (PESC base)."""
    pesc_config, from_dense = resolve_pesc_config(config)
    pesc_config.use_cache = False
    kwargs = dict(
        config=pesc_config,
        dtype=getattr(torch, config["torch_dtype"]),
        attn_implementation=config["attn_implementation"],
        trust_remote_code=config["trust_remote_code"],
    )
    if config["load_in_4bit"]:
        kwargs["quantization_config"] = quantization_config(config)
        device_map = _device_map()
        if device_map is not None:
            kwargs["device_map"] = device_map
    try:
        with _experts_expected_missing() if from_dense else nullcontext():
            model = PescForCausalLM.from_pretrained(config["base_model"], **kwargs)
    except OSError as error:  # Hub messages run over several lines: keep the first
        raise PescError(f"base_model {config['base_model']!r}: {first_line(error)}") from None
    if from_dense:
        _reset_experts(model, config["moe"].get("seed", 0))
    check_experts_unquantized(model)
    return model


@contextmanager
def _experts_expected_missing():
    """A dense checkpoint has no routers or adapters (`_reset_experts` draws them next): transformers is told
    so, and its load report no longer lists them as MISSING, while still naming any other missing tensor."""
    previous = PescForCausalLM._keys_to_ignore_on_load_missing
    PescForCausalLM._keys_to_ignore_on_load_missing = [r"\.moe_adapter\."]
    try:
        yield
    finally:
        PescForCausalLM._keys_to_ignore_on_load_missing = previous


def check_experts_unquantized(model: nn.Module) -> None:
    """Routers and adapters must be plain float parameters of plain nn.Linear / router modules."""
    for name, module in model.named_modules():
        if isinstance(module, PescMoEAdapter):
            for sub_name, sub in module.named_modules():
                if type(sub).__name__.startswith(("Linear4bit", "Linear8bit")):
                    raise PescError(f"{name}.{sub_name} was quantized: routers and adapters must stay in full precision")
            for p_name, param in module.named_parameters():
                if not param.is_floating_point() or type(param) is not nn.Parameter:
                    raise PescError(f"{name}.{p_name} is not a plain float parameter ({type(param).__name__})")


def prepare_for_training(model: PescForCausalLM, config: dict):
    """Gradient checkpointing, LoRA on the dense linears, experts trainable in float32; returns the peft model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

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
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5 name
            if enable is not None:
                enable(activation_checkpointing_kwargs=gc_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=list(config["lora_target_modules"]),
        exclude_modules=r".*moe_adapter.*",
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
    enable_expert_training(peft_model, upcast=not sharded_training())
    return peft_model


def enable_expert_training(model: nn.Module, upcast: bool = True) -> None:
    """Routers and adapters train in full, in float32 (unless `upcast` is False: FSDP / ZeRO-3 keep the
    model dtype, see sharded_training); everything else stays as peft left it."""
    found = 0
    for name, param in model.named_parameters():
        if is_moe_parameter(name):
            if upcast and param.dtype != torch.float32:
                param.data = param.data.float()
            param.requires_grad_(True)
            found += 1
    if not found:
        raise PescError("the model has no PESC routers or adapters to train")


def trainable_summary(model: nn.Module) -> dict[str, int]:
    counts = {"lora": 0, "experts": 0, "other": 0, "total": 0}
    for name, param in model.named_parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        counts["total"] += n
        if param.requires_grad:
            counts["lora" if ".lora_" in name else "experts" if is_moe_parameter(name) else "other"] += n
    return counts


def register_deepspeed_leaf_modules(model: nn.Module) -> bool:
    """ZeRO-3: gather each MoE block whole, or a rank whose tokens skip an expert would wait forever."""
    if not deepspeed_zero3_enabled():
        return False
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as error:  # pragma: no cover - deepspeed not installed here
        raise PescError("DeepSpeed ZeRO-3 is configured but deepspeed is not installed: pip install deepspeed") from error
    set_z3_leaf_modules(model, [PescMoEAdapter])
    return True
