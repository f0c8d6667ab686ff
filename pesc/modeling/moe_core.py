"""What the shipped model code of every method shares: the dense-family wrapper, routing records,
named aux losses, per-sample fields, sibling sites on linears, and the routed dispatch.

Shipped inside every exported checkpoint beside the method's own configuration_<m>.py and
modeling_<m>.py (which import it relatively), so it imports only torch and transformers and
runs on transformers 4.46.3 and later: where the API differs between releases it asks what the
installed release has (a signature, a field name), never which version it is.

A method's model is the dense family's own causal LM (attention, rope, caches run unchanged)
plus the modules the method adds, all under one name prefix and never renaming a base tensor:
- a method that replaces the FFN's computation (PESC) swaps `layer.mlp` for a module that keeps
  the dense `gate_proj` / `up_proj` / `down_proj` under their names and adds its own beside them;
- a method whose experts sit on a linear (LoRA experts, scaled vectors) adds a SIBLING module
  `<prefix><linear>` next to the linear (`attach_sibling`), connected by a hook that follows the
  linear when bitsandbytes or peft replace it.
Each routed site emits a `RoutingRecord`; the causal LM collects them per forward (compile-safe),
computes the method's named aux losses from them and adds their weighted sum to the loss.
"""

import dataclasses
import inspect
import math
import sys
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig


# ---------------------------------------------------------------------------------------
# The flat config: every field of the dense family's config at the top level, beside the
# method's own settings (as the published Camelidae checkpoints have it).
# ---------------------------------------------------------------------------------------
# Keys that describe the checkpoint rather than the base architecture: never copied
# from the dense family's config into ours.
_NOT_BASE_FIELDS = {"model_type", "architectures", "auto_map", "transformers_version"}


def _rope_fields_for(family_config_class: type, fields: dict) -> dict:
    """`fields` with transformers 5's `rope_parameters` turned into the `rope_theta` / `rope_scaling` of a
    family config that predates it (transformers 4.x), so the rotary embedding is the one the checkpoint
    was made with, not the family's default."""
    rope = fields.get("rope_parameters")
    if not isinstance(rope, dict) or hasattr(family_config_class(), "rope_parameters"):
        return fields
    fields = {k: v for k, v in fields.items() if k != "rope_parameters"}
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if scaling.get("rope_type", "default") != "default":
        fields["rope_scaling"] = scaling
    return fields


class FlatMoEConfig(PreTrainedConfig):
    """A dense family's config, flat, plus a method's settings (`method_defaults`, set by each method's config).

    The dense family's own config class validates and completes the base fields, so derived
    fields (head_dim, layer_types, rope settings) are always present. The class has an explicit
    `__init__` (the form every transformers release accepts for remote code) rather than
    dataclass fields, which older releases do not know.
    """

    # The method's fields with their defaults, the one source of them (the CLI and YAML read them here);
    # everything else belongs to the family.
    method_defaults = {}
    # Fields every method's config has: the dense family, the dtype of the added modules, whether the forward
    # returns the router logits and named aux losses by default, and the experts a token is routed to under the
    # name Hugging Face MoE configs and serving engines read (None: every expert, as a dense router mixes them).
    common_defaults = {"base_model_type": "llama", "moe_dtype": None, "output_router_logits": False,
                       "num_experts_per_tok": None}

    def __init__(self, **kwargs):
        for name, default in {**self.common_defaults, **self.method_defaults}.items():
            value = kwargs.pop(name, default)
            if isinstance(default, list) and isinstance(value, str):  # "q_proj,v_proj": a flag; 0.1.0's MoELoRA
                value = [item.strip() for item in value.split(",") if item.strip()]
            setattr(self, name, value)
        if self.num_experts_per_tok is None:
            self.num_experts_per_tok = self.num_experts
        if self.base_model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"unknown base_model_type {self.base_model_type!r}: this transformers version has no such model family"
            )
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        base_fields = _rope_fields_for(family_config_class, {k: v for k, v in kwargs.items() if k not in _NOT_BASE_FIELDS})
        base_config = family_config_class(**base_fields)
        own = {k: kwargs[k] for k in ("auto_map", "architectures") if k in kwargs}
        kwargs = {k: v for k, v in base_config.to_dict().items() if k not in _NOT_BASE_FIELDS} | own
        # Families that alias standard names (GPT-2's n_embd -> hidden_size) get the standard name too.
        for alias in family_config_class.attribute_map:
            kwargs.setdefault(alias, getattr(base_config, alias))
        # Set here, not passed on: transformers 5 drops `use_cache` from a config's kwargs as a generation setting.
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        self.validate_moe_settings()

    def validate_moe_settings(self):
        """Refuse settings that cannot describe a working model, naming the field (each method's own checks)."""

    def check_top_k(self, every_expert: bool = False) -> None:
        """num_experts_per_tok is 1..num_experts; exactly num_experts for a router that mixes every expert."""
        self.require_positive_integers("num_experts", "num_experts_per_tok")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})"
            )
        if every_expert and self.num_experts_per_tok != self.num_experts:
            raise ValueError(f"num_experts_per_tok must be num_experts ({self.num_experts}): the router mixes every "
                             f"expert, got {self.num_experts_per_tok!r}")

    def check_sites(self) -> None:
        """`sites` (where a method's experts sit beside linears) is a non-empty list of distinct linears."""
        sites = self.sites
        known = isinstance(sites, (list, tuple)) and all(isinstance(s, str) and s in LINEAR_PARENTS for s in sites)
        if not known or not sites or len(set(sites)) != len(sites):
            raise ValueError(
                f"sites must be a non-empty list of distinct linears among {', '.join(LINEAR_PARENTS)}, got {sites!r}"
            )

    def require_positive_integers(self, *names: str) -> None:
        """The named fields are positive integers (not bools), or a ValueError naming the first that is not."""
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # The ranges a method's number fields are checked against: (test, how the error words it).
    number_ranges = {
        "positive": (lambda v: v > 0, "a positive number"),
        "non-negative": (lambda v: v >= 0, ">= 0"),
        "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    }

    def require_numbers(self, bounds: str, *names: str) -> None:
        """The named fields are finite numbers (not bools) in the range `number_ranges[bounds]`, or a ValueError
        naming the first that is not."""
        within, wording = self.number_ranges[bounds]
        for name in names:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not within(value):
                raise ValueError(f"{name} must be {wording}, got {value!r}")

    def base_config(self) -> PreTrainedConfig:
        """The dense family's own config, rebuilt from our flat fields."""
        own = {**self.common_defaults, **self.method_defaults}
        fields = {k: v for k, v in self.to_dict().items() if k not in own and k not in _NOT_BASE_FIELDS}
        family_config_class = CONFIG_MAPPING[self.base_model_type]
        return family_config_class(**_rope_fields_for(family_config_class, fields))


# ---------------------------------------------------------------------------------------
# Routing records are gathered through a context variable rather than returned by each
# layer, so the dense family's decoder layers run unchanged. Only the forward pass of
# MoEForCausalLM opens a sink; a gradient-checkpointing recompute (outside it) records
# nothing twice.
# ---------------------------------------------------------------------------------------
class _CompileSafeContextVar:
    """A ContextVar (thread- and context-safe) whose value a compiled graph reads from a plain attribute.

    Dynamo cannot trace `ContextVar.get` (transformers' own output capture makes the same
    switch), so every `set` also stores the value where a graph can read it; that copy
    alone is shared by threads.
    """

    def __init__(self, name: str):
        self._context_var: ContextVar = ContextVar(name, default=None)
        self._for_graphs = None

    def get(self):
        return self._for_graphs if torch.compiler.is_compiling() else self._context_var.get()

    def set(self, value) -> tuple:
        previous, self._for_graphs = self._for_graphs, value
        return previous, None if torch.compiler.is_compiling() else self._context_var.set(value)

    def reset(self, handle: tuple) -> None:
        self._for_graphs, token = handle
        if token is not None:
            self._context_var.reset(token)




_ROUTING_SINK = _CompileSafeContextVar("pesc_routing_records")


class RoutingRecord(NamedTuple):
    """What one routed site did on one forward, for the aux losses and the expert-load statistics.

    site: the site's name ("mlp", "q_proj", ...); layer: its decoder layer; logits: router logits
    [tokens, experts] (dense routers too); selected: [tokens, k] expert indices, or None when every
    expert is active (dense softmax); extras: whatever a method's loss needs besides (or None).
    """

    site: str
    layer: int
    logits: torch.Tensor
    selected: torch.Tensor | None = None
    extras: dict | None = None


@contextmanager
def record_routing():
    """Collect, in call order, the `RoutingRecord` of every routed site run inside the block."""
    sink: list = []
    token = _ROUTING_SINK.set(sink)
    try:
        yield sink
    finally:
        _ROUTING_SINK.reset(token)


def emit_routing_record(site: str, layer: int, logits: torch.Tensor, selected=None, extras=None) -> None:
    """Record one site's routing, when a causal LM's forward is collecting (else nothing happens)."""
    sink = _ROUTING_SINK.get()
    if sink is not None:
        sink.append(RoutingRecord(site, layer, logits, selected, extras))


# Up to this p, a CPU mask is drawn as the positions of its drops (the gaps between them: ~p draws an
# element) rather than as a random word an element (mt19937 costs ~1.7 ns a word): 2M elements at p 0.05 take
# 1.6 ms to draw and zero, against 5.6 ms for the word-per-element mask. Up to 0.125 the positions (int64) also
# take no more memory than the bool mask they replace.
_DROP_POSITIONS_MAX_P = 0.125


def dropout_mask(shape: tuple, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(drop, keep scale): which elements of a tensor of `shape` to zero, each with probability p independently,
    and 1 / (1 - p) (see `zero_dropped`).

    On the CPU with p <= 0.125, `drop` holds the flat indices of the dropped elements, sorted: the gaps between
    drops are independent geometric draws (P(gap = j) = p (1 - p)^(j-1), exactly the gaps of independent
    Bernoulli trials), so only ~p of the elements cost a draw. Otherwise `drop` is a boolean mask of `shape`, from
    32 random bits an element compared with round(p * 2**32): the probability is p to within 2**-33 (as float32
    uniforms give it), at a fraction of the cost of `bernoulli_` on the CPU, stored as bytes, not as the float
    noise `F.dropout` keeps.
    """
    numel = math.prod(shape)
    if device.type == "cpu" and 0 < p <= _DROP_POSITIONS_MAX_P:
        return _drop_positions(numel, p), 1 / (1 - p)
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(-(2**63), None)
    threshold = round(p * 2**32)
    drop = bits.view(torch.int32)[:numel].view(shape) < threshold - 2**31
    return drop, 2**32 / (2**32 - threshold)


def _drop_positions(numel: int, p: float) -> torch.Tensor:
    """The sorted flat indices below `numel` that independent Bernoulli(p) trials drop (int64, CPU)."""
    expected = numel * p
    chunks, last = [], -1  # `last`: the index of the last drop drawn so far
    while last < numel:  # a first draw of ~6 sigma over the expected count almost always ends it
        gaps = torch.empty(int(expected + 6 * math.sqrt(expected) + 16), dtype=torch.int64).geometric_(p)
        # gaps are >= 1; a uniform draw of exactly 0 (odds 2**-53) would give +inf, cast to a negative integer
        positions = gaps.clamp_(min=1).cumsum_(0).add_(last)
        chunks.append(positions)
        last = int(positions[-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, numel))]


def zero_dropped(tensor: torch.Tensor, drop: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """`tensor` with the elements that `dropout_mask`'s `drop` names set to zero (autograd-safe out of place)."""
    if drop.dtype == torch.bool:
        return tensor.masked_fill_(drop, 0) if in_place else tensor.masked_fill(drop, 0)
    if in_place:
        tensor.view(-1).index_fill_(0, drop, 0)
        return tensor
    return tensor.reshape(-1).index_fill(0, drop, 0).view(tensor.shape)


class GatherRows(torch.autograd.Function):
    """rows[p] = x[source[p]]: each token's row repeated k times, in expert-sorted order, with
    the elements of an optional `drop` mask zeroed (the experts' input dropout, one mask for every
    (token, expert) pair, applied in the same pass; the keep scale is the caller's).

    The backward is the adjoint `CombineRows` (a gather plus a sum over k), so neither
    direction scatters: no zero-filled buffers, no atomics, deterministic on every device.
    """

    @staticmethod
    def forward(ctx, x, source, inverse, top_k, drop=None):
        ctx.save_for_backward(source, inverse, drop)
        ctx.top_k = top_k
        rows = x.index_select(0, source)
        return rows if drop is None else zero_dropped(rows, drop, in_place=True)

    @staticmethod
    def backward(ctx, grad):
        source, inverse, drop = ctx.saved_tensors
        if drop is not None:
            grad = zero_dropped(grad, drop)
        return CombineRows.apply(grad, source, inverse, ctx.top_k), None, None, None, None


class CombineRows(torch.autograd.Function):
    """out[t] = sum_j rows[inverse[t * k + j]]: expert-sorted rows summed back per token."""

    @staticmethod
    def forward(ctx, rows, source, inverse, top_k):
        ctx.save_for_backward(source, inverse)
        ctx.top_k = top_k
        return rows.index_select(0, inverse).view(-1, top_k, rows.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        source, inverse = ctx.saved_tensors
        return GatherRows.apply(grad, source, inverse, ctx.top_k, None), None, None, None




def traced_for_every_shape() -> bool:
    """Whether this runs inside a compiled inference graph that must serve every token count (vLLM traces one so):
    routing there needs fixed shapes, with no host sync and no shape read from the data (`routed_dispatch` has both)."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def routed_dispatch(rows: torch.Tensor, routing_weights: torch.Tensor, selected: torch.Tensor, experts: list,
                    weighted_expert_output, input_dropout: float | None = None) -> torch.Tensor:
    """sum_j w_j * expert_{s_j}(row) for every row, each expert run on its own rows only (top-k methods share it).

    Rows are sorted by expert (one sort, one gather) and summed back per row (a gather, no
    scatter). `weighted_expert_output(expert, rows, weights [rows, 1])` computes one expert's
    weighted output. With autograd every expert runs, on zero rows if idle, so its parameters
    join the graph (DDP and ZeRO-3 need that); without it idle experts are skipped.

    `input_dropout` p: the experts' input dropout, done here for all of them at once (one mask
    over the gathered rows, each (row, expert) pair its own), much cheaper than a dropout per
    expert; `weighted_expert_output` is then called with `keep_scale=1 / (1 - p)` to apply.
    """
    top_k = selected.shape[-1]
    flat_experts = selected.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    source = order // top_k
    counts = torch.bincount(flat_experts, minlength=len(experts)).tolist()
    weights = routing_weights.reshape(-1)[order].unsqueeze(-1)
    drop, dropout_kwargs = None, {}
    if input_dropout:
        drop, keep_scale = dropout_mask((source.shape[0], rows.shape[-1]), input_dropout, rows.device)
        dropout_kwargs = {"keep_scale": keep_scale}
    gathered = GatherRows.apply(rows, source, inverse, top_k, drop)
    outputs = []
    skip_idle = not torch.is_grad_enabled()
    for expert, expert_rows, expert_weights in zip(experts, gathered.split(counts), weights.split(counts)):
        if skip_idle and expert_rows.shape[0] == 0:
            continue
        outputs.append(weighted_expert_output(expert, expert_rows, expert_weights, **dropout_kwargs))
    return CombineRows.apply(torch.cat(outputs), source, inverse, top_k)


def token_mask(attention_mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Which of the `rows` token rows of the flattened batch are not padding ([rows] bool), or None (no mask known).

    A 2-D attention mask [batch, keys] covers the rows when their number is a multiple of the batch (the
    last rows // batch keys are the tokens; a packed batch has no mask)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    batch = attention_mask.shape[0]
    mask = attention_mask[:, -(rows // batch) :] if rows % batch == 0 else None
    return mask.reshape(-1).bool() if mask is not None and mask.numel() == rows else None


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style balance loss E * sum_i f_i * P_i, per layer, averaged over layers.

    f_i: share of the top-k assignments that went to expert i (sums to 1); P_i: mean
    full-softmax probability of expert i. Both are taken over non-padding tokens only.
    Perfect balance gives 1.0; the caller multiplies by `router_aux_loss_coef`.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one layer")
    device = router_logits[0].device
    mask = token_mask(attention_mask, router_logits[0].shape[0])
    token_weight = None if mask is None else mask.reshape(-1, 1).to(device=device, dtype=torch.float32)
    layer_losses = []
    for logits in router_logits:
        logits = logits.to(device).float()
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, torch.topk(logits, top_k, dim=-1).indices, 1.0)
        if token_weight is None:
            tokens = probs.new_tensor(float(probs.shape[0]))
            chosen_sum, prob_sum = chosen.sum(0), probs.sum(0)
        else:
            tokens = token_weight.sum().clamp_min(1.0)
            chosen_sum, prob_sum = (chosen * token_weight).sum(0), (probs * token_weight).sum(0)
        fraction_routed = chosen_sum / (tokens * top_k)
        mean_probability = prob_sum / tokens
        layer_losses.append(num_experts * torch.sum(fraction_routed * mean_probability))
    return torch.stack(layer_losses).mean()


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


# ---------------------------------------------------------------------------------------
# Sibling sites: a method's module beside a linear it acts on, connected by a hook.
# ---------------------------------------------------------------------------------------
class _SiblingConnection:
    """Connects `parent.<sibling>` to whatever module `parent.<linear>` is at the parent's next forward.

    bitsandbytes swaps the linear for a Linear4bit at load time and peft wraps it in a LoRA layer:
    the parent's forward pre-hook notices the new object, moves the hook to it (removing the old
    one, so the sibling never acts twice), and the base tensor names stay where they were.
    """

    def __init__(self, linear: str, sibling: str, position: str):
        self.linear, self.sibling, self.position = linear, sibling, position
        self._hooked = None
        self._handle = None

    def reconnect(self, parent: nn.Module, args) -> None:
        linear = parent._modules[self.linear]
        if linear is self._hooked:
            return
        if self._handle is not None:
            self._handle.remove()
        sibling = parent._modules[self.sibling]
        if self.position == "output":
            self._handle = linear.register_forward_hook(sibling.linear_output_hook)
        else:
            self._handle = linear.register_forward_pre_hook(sibling.linear_input_hook)
        self._hooked = linear


# The linears a method's site may sit on, and the module of a decoder layer that holds each (the
# gated-MLP families: llama, mistral, qwen2, ...).
LINEAR_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}  # fmt: skip
def linear_on(layer: nn.Module, parent_name: str, linear_name: str, base_model_type: str, label: str) -> nn.Linear:
    """`layer.<parent>.<linear>` of a decoder layer, or a one-line error saying the family has no such linear."""
    linear = getattr(getattr(layer, parent_name, None), linear_name, None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"{label} cannot wrap model family {base_model_type!r}: its decoder layers have no linear "
            f"{parent_name}.{linear_name}"
        )
    return linear


def attach_sibling(parent: nn.Module, linear: str, sibling_name: str, sibling: nn.Module, position: str) -> None:
    """Add `sibling` as `parent.<sibling_name>` and let it act on `parent.<linear>` at `position`.

    position "output": the linear's output becomes `sibling.linear_output_hook(linear, (x,), output)`
    (e.g. LoRA experts: output + experts(x); MoV: output * vector); "input": the linear's input
    becomes what `sibling.linear_input_hook(linear, (x,))` returns (e.g. MoV on down_proj's input).
    """
    if position not in ("output", "input"):
        raise ValueError(f"a sibling site acts on a linear's 'output' or 'input', not {position!r}")
    if not isinstance(parent._modules.get(linear), nn.Module):
        raise ValueError(f"{type(parent).__name__} has no module {linear!r} to attach {sibling_name!r} to")
    parent.add_module(sibling_name, sibling)
    connection = _SiblingConnection(linear, sibling_name, position)
    connection.reconnect(parent, ())  # now: a compiled first forward (vLLM's) cannot register hooks
    parent.register_forward_pre_hook(connection.reconnect)


class UnmergedLinear(nn.Module):
    """nn.Linear's computation under a class that is not nn.Linear (what `MoEModel` makes of a linear a site acts on).

    Serving engines merge sibling linears they recognise by type (vLLM's Transformers backend turns q/k/v
    and gate/up into one linear and deletes the three), which would leave a site's hook on nothing.
    """

    forward = nn.Linear.forward
    extra_repr = nn.Linear.extra_repr


def site_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, linear name) of every linear a sibling site acts on."""
    found = []
    for parent in model.modules():
        for hook in parent._forward_pre_hooks.values():
            connection = getattr(hook, "__self__", None)
            if isinstance(connection, _SiblingConnection):
                found.append((parent, connection.linear))
    return found


# ---------------------------------------------------------------------------------------
# The causal LM every method builds on.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class MoECausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE output (`aux_loss` is the Switch balance loss, as there), plus every named aux
    loss of the method (`aux_losses`) and, when asked with `output_routing_records=True`, the records."""

    aux_losses: dict | None = None
    routing_records: tuple | None = None


def per_token(values: torch.Tensor, tokens: int, attention_mask=None, position_ids=None) -> torch.Tensor:
    """One value per sample spread to one per token row of the flattened batch.

    Padded batches: `values` [batch], one row per sequence. Packed batches ([1, total], no attention
    mask): one value per packed sequence, the sequences told apart by position_ids restarting at 0.
    """
    values = values.reshape(-1)
    if attention_mask is None and position_ids is not None and position_ids.shape[0] == 1 and values.numel() > 1:
        starts = (position_ids.reshape(-1) == 0).to(torch.long)
        return values[(starts.cumsum(0) - 1).clamp_min(0)]
    return values.repeat_interleave(tokens // values.numel())


class MoEPreTrainedModel(PreTrainedModel):
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

    def init_method_module(self, module: nn.Module) -> bool:
        """Initialise `module` if the method added it and return True; False hands it to the family."""
        return False


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


def refuse_sharded_attention_sites(config, hooked_linears: list[str]) -> None:
    """A clear error where vLLM would split attention over tensor-parallel ranks while sites hook attention linears.

    vLLM splits the attention heads across tensor-parallel ranks, but a linear a site acts on stays whole
    (`UnmergedLinear`), so attention would mix whole and sharded projections: at 2 ranks MoELoRA's q/v sites
    gave wrong tokens without an error and MoV's k/v sites a shape error. Sites on the FFN only, and pipeline
    parallelism (whole layers per rank), run fine.
    """
    attention = sorted({name for name in hooked_linears if LINEAR_PARENTS.get(name) == "self_attn"})
    ranks = vllm_tensor_parallel_ranks() if config._attn_implementation == "vllm" else 1
    if attention and ranks > 1:
        raise ValueError(
            f"this model's sites act on attention linears ({', '.join(attention)}), which vLLM cannot split across "
            f"{ranks} tensor-parallel ranks: serve it with tensor_parallel_size=1 (pipeline parallelism works)"
        )


def vllm_tensor_parallel_ranks() -> int:
    """vLLM's tensor-parallel size while vLLM builds this model (read from its already loaded module: the shipped
    code imports nothing of vLLM), else 1."""
    state = sys.modules.get("vllm.distributed.parallel_state")
    if state is None or not state.model_parallel_is_initialized():
        return 1
    return state.get_tensor_model_parallel_world_size()


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
