"""The PESC model definition. The two files beside this one ship inside every checkpoint.

Importing this package registers the classes with the transformers Auto* factories, so
`AutoModelForCausalLM.from_pretrained` works on a PESC checkpoint without remote code
whenever pesc is installed, and `save_pretrained` copies the model code into the folder.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_pesc import PescConfig
from .modeling_pesc import (
    PescAdapter,
    PescForCausalLM,
    PescMLP,
    PescMoEAdapter,
    PescRouter,
    init_expert_weights,
    load_balancing_loss,
    record_router_logits,
)

AutoConfig.register(PescConfig.model_type, PescConfig, exist_ok=True)
AutoModelForCausalLM.register(PescConfig, PescForCausalLM, exist_ok=True)
PescConfig.register_for_auto_class()
PescForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PescAdapter",
    "PescConfig",
    "PescForCausalLM",
    "PescMLP",
    "PescMoEAdapter",
    "PescRouter",
    "init_expert_weights",
    "load_balancing_loss",
    "record_router_logits",
]
