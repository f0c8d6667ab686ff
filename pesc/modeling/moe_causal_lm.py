"""The causal LM every method builds on, the backbone `AutoModel` loads, and their output.

A method's model is the dense family's own causal LM (attention, rope, caches run unchanged)
plus the modules the method adds, all under one name prefix and never renaming a base tensor:
- a method that replaces the FFN's computation (PESC) swaps `layer.mlp` for a module that keeps
  the dense `gate_proj` / `up_proj` / `down_proj` under their names and adds its own beside them;
- a method whose experts sit on a linear (LoRA experts, scaled vectors) adds a sibling module
  next to the linear (moe_sites.attach_sibling).
The causal LM collects the routing records of a forward (moe_routing), computes the method's named
aux losses from them and adds their weighted sum to the loss.

Shipped in every checkpoint, so it imports only torch and transformers and runs on transformers
4.46.3 and later: where the API differs between releases it asks what the installed release has (a
signature, a field name), never which version it is.
"""

import ast
import dataclasses
import importlib
import inspect
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .moe_routing import per_token, record_routing
from .moe_sites import UnmergedLinear, refuse_sharded_attention_sites, site_linears


def code_files(*classes: type) -> list[Path]:
    """The source files of `classes` and of every module they import relatively, recursively, sorted by name.

    The modules are followed as loaded (through the import system), not as files beside each other: inside pesc a
    method's files and the shared files they import sit in different folders; inside a checkpoint, together."""
    found, pending = {}, [cls.__module__ for cls in classes]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        module = importlib.import_module(name)
        found[name] = Path(module.__file__)
        for node in ast.walk(ast.parse(found[name].read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                pending.append(f"{module.__package__}.{node.module}")
    return sorted(set(found.values()), key=lambda path: path.name)


def dense_family_classes(base_model_type: str, method: str = "PESC") -> tuple[type, type]:
    """The dense family's backbone class and causal-LM class (as the Auto* factories pick them), or a clear error."""
    family_config_class = CONFIG_MAPPING[base_model_type]
    if family_config_class not in MODEL_MAPPING or family_config_class not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"{method} cannot wrap model family {base_model_type!r}: transformers has no decoder-only causal LM for it"
        )
    return MODEL_MAPPING[family_config_class], MODEL_FOR_CAUSAL_LM_MAPPING[family_config_class]


# The output field that carries the cache: `cache` since transformers 5.24, `past_key_values` before.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"


@dataclasses.dataclass
class MoECausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output (`aux_loss` is the Switch balance loss, as there), plus every named aux
    loss of the method (`aux_losses`) and, when asked with `output_routing_records=True`, the records."""

    aux_losses: dict | None = None
    routing_records: tuple | None = None


class MethodModules:
    """What every method's model adds to the family's PreTrainedModel, causal or encoder-decoder: the method's
    modules get the method's init, and `save_pretrained` writes the model code beside the weights."""

    @torch.no_grad()
    def _init_weights(self, module):
        """The method's modules get the method's init (`init_method_module`); everything else the family's.

        A module whose own parameters were all loaded (and which holds no buffer of its own) is left alone.
        transformers 5 flags each loaded tensor (`_is_hf_initialized`); 5.0 (not 5.3 on) still calls this for
        the module afterwards, guarding only `torch.nn.init` calls on the flagged tensors themselves: an init
        through a view (one expert of a stacked parameter) or a tensor method would overwrite loaded values.
        """
        own = list(module.parameters(recurse=False))
        loaded = own and all(getattr(parameter, "_is_hf_initialized", False) for parameter in own)
        if loaded and next(module.buffers(recurse=False), None) is None:
            return
        if not self.init_method_module(module):
            self._family_init_weights(module)

    def _family_init_weights(self, module):
        """The family's own init of `module` (the next `_init_weights` in the class order)."""
        super()._init_weights(module)

    def init_method_module(self, module: nn.Module) -> bool:
        """Initialise `module` if the method added it and return True; False hands it to the family."""
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write the model code too (`code_files` of the model and its config), so the folder loads with
        `trust_remote_code=True`; before the weights, so that a push includes it."""
        if kwargs.get("is_main_process", True):
            os.makedirs(save_directory, exist_ok=True)
            for path in code_files(type(self), type(self.config)):
                shutil.copyfile(path, os.path.join(save_directory, path.name))
        return super().save_pretrained(save_directory, *args, **kwargs)


class MoEPreTrainedModel(MethodModules, PreTrainedModel):
    """transformers' switches, the same for every method (the family's own modules run unchanged)."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # What transformers 4.x asks instead (read there, unknown to 5.x): caches are Cache objects,
    # static and quantized caches work, and FlashAttention 2 is named so.
    _supports_cache_class = True
    _supports_static_cache = True
    _supports_quantized_cache = True
    _supports_flash_attn_2 = True
    _can_compile_fullgraph = True  # a decode step (static cache) compiles to one graph


class MoEModel(MoEPreTrainedModel):
    """What `AutoModel` loads (vLLM's Transformers backend among others): the backbone of `causal_lm_class`.

    Instantiating it returns that causal LM's `model`: an instance of the dense family's own
    backbone class with the method's modules in its layers, so its parameter names, forward
    and attention (through ALL_ATTENTION_FUNCTIONS, kwargs passed down) are the family's. The
    linears that sibling sites act on become `UnmergedLinear`s (same tensors, same computation),
    which serving engines do not merge away from under their hooks; so bitsandbytes and peft, which
    look for nn.Linear, do not touch them here (train the causal LM, not this backbone).
    """

    causal_lm_class: type = None

    def __new__(cls, config, *args, **kwargs):
        backbone = cls.causal_lm_class(config, *args, **kwargs).model
        hooked = site_linears(backbone)
        refuse_sharded_attention_sites(config, [name for _, name in hooked])
        for parent, name in hooked:
            if type(parent._modules[name]) is nn.Linear:
                parent._modules[name].__class__ = UnmergedLinear
        return backbone


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    """Causal LM of a dense family plus a method's modules (`add_method_modules`, once per decoder layer).

    The dense family's own backbone and causal-LM forward run unchanged (attention, rope,
    caches, logit soft-capping...), so the wrapped model is that family exactly, plus the
    method. The forward pops the method's per-sample fields (`sample_fields`) from its kwargs,
    collects the routing records, and adds the weighted named aux losses to the loss.
    """

    method_label = "MoE"  # how errors name the method ("PESC cannot wrap model family ...")
    sample_fields: tuple = ()  # per-sample forward kwargs the method's losses read (e.g. "task_type")
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        backbone_class, causal_lm_class = dense_family_classes(config.base_model_type, self.method_label)
        self._dense_forward = causal_lm_class.forward
        # names only: a signature's mappingproxy would make the model impossible to deepcopy or pickle
        self._dense_forward_params = frozenset(inspect.signature(causal_lm_class.forward).parameters)
        self.model = backbone_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        layers = getattr(self.model, "layers", None)
        if layers is None:
            raise ValueError(
                f"{self.method_label} cannot wrap model family {config.base_model_type!r}: its backbone has no "
                "`layers` list"
            )
        for layer_idx, layer in enumerate(layers):
            self.add_method_modules(layer, layer_idx, config)
        # The backbone is a PreTrainedModel of its own, so transformers initialises its
        # children (the method's modules included) with the backbone's `_init_weights`: route it
        # to ours, which hands the family's modules to the family's own init, bound to the
        # backbone (an instance of the family's class, as that init may require).
        self._family_init_weights = self.model._init_weights
        self.model._init_weights = self._init_weights
        self.post_init()

    def add_method_modules(self, layer: nn.Module, layer_idx: int, config) -> None:
        """Put the method's modules into one decoder layer (a replaced mlp, siblings of linears, ...)."""
        raise NotImplementedError

    def aux_loss_coefficients(self) -> dict[str, float]:
        """Each named aux loss's weight in the training loss (from the config)."""
        return {}

    def compute_aux_losses(self, records: tuple, attention_mask, sample_values: dict) -> dict[str, torch.Tensor]:
        """The method's named aux losses from this forward's routing records and per-token sample values (each
        given field's value at every token, and `sample_index`: the sample each token belongs to)."""
        return {}

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def tie_weights(self, *args, **kwargs):
        """The usual tying, and where loading left a tied `lm_head` unset (still on the meta device:
        transformers 5.3 skips the tie for remote code), the input embedding that `tie_word_embeddings` asks for."""
        result = super().tie_weights(*args, **kwargs)
        embedding = self.get_input_embeddings().weight
        if getattr(self.config, "tie_word_embeddings", False) and self.lm_head.weight.is_meta and not embedding.is_meta:
            self.lm_head.weight = embedding
        return result

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        output_routing_records: bool = False,
        **kwargs,
    ) -> MoECausalLMOutput | tuple:
        samples = {name: kwargs.pop(name) for name in self.sample_fields if kwargs.get(name) is not None}
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if return_dict is None:
            return_dict = self.config.return_dict
        # What the family's forward takes: transformers 4.x names `num_logits_to_keep` and `return_dict`.
        params = self._dense_forward_params
        dense_kwargs = {"logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep": logits_to_keep}
        if "return_dict" in params:
            dense_kwargs["return_dict"] = True
        with record_routing() as records:
            outputs = self._dense_forward(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **dense_kwargs,
                **kwargs,
            )
        records = tuple(records)
        router_logits = tuple(record.logits for record in records)
        loss, aux_losses = outputs.loss, None
        coefficients = self.aux_loss_coefficients()
        if records and (output_router_logits or (labels is not None and any(c > 0 for c in coefficients.values()))):
            tokens = records[0].logits.shape[0]
            sample_values = {
                name: per_token(value.to(records[0].logits.device), tokens, attention_mask, position_ids)
                for name, value in samples.items()
            }
            if samples:  # which sample each token belongs to, told apart by the same rule
                count = next(iter(samples.values())).numel()
                sample_values["sample_index"] = per_token(
                    torch.arange(count, device=records[0].logits.device), tokens, attention_mask, position_ids
                )
            aux_losses = self.compute_aux_losses(records, attention_mask, sample_values)
            if self.training:
                self._warn_if_router_gradient_lost(router_logits)
            if loss is not None:
                for name, value in aux_losses.items():
                    loss = loss + coefficients[name] * value.to(loss.device)
        output = MoECausalLMOutput(
            loss=loss,
            aux_loss=aux_losses.get("aux_loss") if aux_losses else None,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
            aux_losses=aux_losses if output_router_logits else None,
            routing_records=records if output_routing_records else None,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD, None)},
        )
        return output if return_dict else output.to_tuple()

    def _warn_if_router_gradient_lost(self, router_logits: tuple[torch.Tensor, ...]) -> None:
        """Reentrant gradient checkpointing runs layers under no_grad: the aux losses would silently stop training."""
        routers_train = any(p.requires_grad for n, p in self.named_parameters() if ".router." in n)
        if routers_train and torch.is_grad_enabled() and not any(t.requires_grad for t in router_logits):
            warnings.warn(
                f"{self.method_label} router logits carry no gradient, so the load-balancing loss cannot train the "
                "routers; use gradient checkpointing with use_reentrant=False",
                stacklevel=3,
            )
