"""The shipped model code: moe_core.py (shared by every method) and each method's configuration_<m>.py /
modeling_<m>.py. These files ship inside every checkpoint of their method.

Importing this package registers the classes with the transformers Auto* factories, so
`AutoModelForCausalLM.from_pretrained` works on a PESC checkpoint without remote code
whenever pesc is installed, and `save_pretrained` copies the model code into the folder.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_pesc import PescConfig
from .modeling_pesc import (
    PescAdapter,
    PescForCausalLM,
    PescMLP,
    PescModel,
    PescMoEAdapter,
    PescRouter,
    init_expert_weights,
)
from .moe_core import RoutingRecord, attach_sibling, emit_routing_record, load_balancing_loss, record_routing

AutoConfig.register(PescConfig.model_type, PescConfig, exist_ok=True)
AutoModel.register(PescConfig, PescModel, exist_ok=True)
AutoModelForCausalLM.register(PescConfig, PescForCausalLM, exist_ok=True)
PescConfig.register_for_auto_class()
PescForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PescModel.register_for_auto_class("AutoModel")

__all__ = [
    "PescAdapter",
    "PescConfig",
    "PescForCausalLM",
    "PescMLP",
    "PescModel",
    "PescMoEAdapter",
    "PescRouter",
    "init_expert_weights",
    "load_balancing_loss",
    "RoutingRecord",
    "attach_sibling",
    "emit_routing_record",
    "record_routing",
]
