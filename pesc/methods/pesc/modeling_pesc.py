"""The PESC sparse model: a dense decoder whose gated FFN is shared by top-k routed adapter experts.

Shipped inside every exported checkpoint, so it imports only torch, transformers and its
sibling files (configuration_pesc.py, and the shared moe_*.py: the dense-family wrapper, routing
records, the balance loss and the routed dispatch). The pieces:
`PescRouter` (which experts, with what weights), `PescAdapter` (one expert),
`PescMoEAdapter` (dispatch of tokens to experts), `PescMLP` (the dense FFN plus the MoE
adapter) and `PescForCausalLM` (the method's hooks into moe_causal_lm.MoEForCausalLM).

Layer output (arXiv 2401.02731, Eq. 7-10):
    F(x) = down(act(gate(x)) * up(x))                    computed once per token
    y    = F(x) + sum_{i in topk(x)} w_i * s * up_i(GELU(down_i(dropout(F(x)))))
with the k weights a float32 softmax over the top-k router logits. `up_i` starts at
zero, so a freshly upcycled model computes exactly the dense model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_pesc import PescConfig
from .moe_causal_lm import MoEForCausalLM, MoEModel
from .moe_dispatch import routed_dispatch, traced_for_every_shape
from .moe_routing import emit_routing_record, load_balancing_loss

# Unused here, imported for transformers before 5.12: from a local checkpoint folder it copies only the files
# that the loaded file itself imports relatively, so the files moe_causal_lm and moe_dispatch import are named
# here too (tests/modeling/test_shipped_imports.py).
from .moe_dropout import dropout_mask  # noqa: F401
from .moe_sites import site_linears  # noqa: F401

class PescRouter(nn.Module):
    """Linear router on the FFN input; picks the top-k experts with float32 softmax weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits [tokens, experts] in the router's dtype."""
        return F.linear(hidden_states.to(self.weight.dtype), self.weight)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and their weights (softmax over the k logits, float32; Mixtral's rule)."""
        top_logits, top_experts = torch.topk(router_logits, self.top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1, dtype=torch.float32), top_experts


class AdapterDownProjection(nn.Linear):
    """An adapter's input projection; its own type so weight init can tell it apart."""


class AdapterUpProjection(nn.Linear):
    """An adapter's output projection, zero at init so a new expert adds nothing."""


class PescAdapter(nn.Module):
    """One expert: a bottleneck adapter on the dense FFN output, s * up(GELU(down(dropout(h))))."""

    def __init__(self, hidden_size: int, adapter_dim: int, scaling: float, dropout: float):
        super().__init__()
        self.adapter_down = AdapterDownProjection(hidden_size, adapter_dim, bias=False)
        self.adapter_up = AdapterUpProjection(adapter_dim, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scaling = scaling

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.adapter_down.weight.dtype)
        hidden = F.gelu(self.adapter_down(self.dropout(hidden_states)))
        return self.adapter_up(hidden) * self.scaling


# The decode paths below reach experts' parts through `_modules` / `_parameters` rather than
# attribute access: nn.Module's `__getattr__` costs ~1.4 us a lookup on a slow host, and a
# decode step makes dozens per layer, which eager decoding (bound by the host on a GPU)
# pays in full.


def _weights_usable_directly(expert: nn.Module) -> bool:
    """Whether the fast paths may apply the expert's weights themselves instead of calling it.

    True for a `PescAdapter` whose projections are still plain linears (not wrapped by
    peft, not quantized) and whose dropout is inactive (else each call needs its own mask).
    """
    if type(expert) is not PescAdapter:
        return False
    parts = expert._modules
    dropout = parts["dropout"]
    return (
        type(parts["adapter_down"]) is AdapterDownProjection
        and type(parts["adapter_up"]) is AdapterUpProjection
        and (dropout.p == 0 or not dropout.training)
    )


def _projection_weights(expert: PescAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapter_down.weight, adapter_up.weight) of an expert that `_weights_usable_directly` accepts."""
    parts = expert._modules
    return parts["adapter_down"]._parameters["weight"], parts["adapter_up"]._parameters["weight"]


# Without autograd, small inputs are decode steps of generation (measured by pesc's
# generation benchmark on a CPU host and an H100): on the CPU, while a step's k-of-E picks can
# cover at most half the experts, "selected" (the host sync is free there, and the idle
# experts' weights are never read); above that and up to _DECODE_ROWS_CPU rows, "all";
# on CUDA up to _DECODE_ROWS rows, "all" (a fixed dozen kernels, no host sync).
_DECODE_ROWS = 64
_DECODE_ROWS_CPU = 16


class PescMoEAdapter(nn.Module):
    """Router plus experts; adds each token's k weighted expert outputs to its FFN output.

    Three dispatches compute the same sum (pick with `_dispatch`: "auto", "routed",
    "all", "selected"):

    * routed: tokens are sorted by expert (one sort, one gather), each expert runs on its
      own rows only, and the rows are summed back per token (a gather, no scatter).
      Works for any expert module and any dropout; the experts' own shared dropout is applied
      to all gathered rows at once (`routed_dispatch`'s `input_dropout`).
    * all: every expert on every token as two wide matmuls over the concatenated adapter
      weights, with the routing weights (zero off the top-k) applied to the bottleneck.
      (E/k)x the adapter FLOPs but a handful of kernels and no host sync, so it wins where
      launches, not FLOPs, cost (CUDA, small bottlenecks). Only for `PescAdapter` experts
      with plain linear projections (it reads their weights) and without active dropout
      (each expert must see its own dropout mask). Inside a compiled graph it never reads the
      cached stacked copies: it stacks afresh on CUDA and runs expert by expert on the CPU
      (`_stack_inside_graph`).
    * selected: without autograd only, the picked experts are grouped on the host and each
      runs on its rows; the idle ones are not touched at all. Any expert module.

    "auto" takes what measured fastest in pesc's layer and generation benchmarks (CPU
    and H100). With autograd every expert's parameters join the graph, even
    with no routed token (DDP and ZeRO-3 need that), and a zero `adapter_up` adds exactly
    zero.
    """

    _dispatch = "auto"

    def __init__(self, config: PescConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # names its routing records
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = PescRouter(config.hidden_size, config.num_experts, config.num_experts_per_tok)
        self._stack_cache = None  # (weights' identity, stacked down, stacked up), generation only
        self.experts = nn.ModuleDict(
            {
                f"expert_{i}": PescAdapter(
                    config.hidden_size, config.adapter_dim, config.moe_scaling, config.adapter_dropout
                )
                for i in range(config.num_experts)
            }
        )

    def forward(self, router_input: torch.Tensor, ffn_output: torch.Tensor) -> torch.Tensor:
        """`ffn_output` plus the routed sum of expert outputs."""
        shape = ffn_output.shape
        ffn_rows = ffn_output.reshape(-1, shape[-1])
        router_logits = self.router(router_input.reshape(-1, router_input.shape[-1]))
        routing_weights, selected = self.router.route(router_logits)
        emit_routing_record("mlp", self.layer_idx, router_logits, selected)
        if torch.is_grad_enabled():
            self._stack_cache = None  # generation's cached stacks must not outlive it into training
        dispatches = {
            "all": self._all_experts_forward,
            "selected": self._selected_experts_forward,
            "routed": self._routed_forward,
        }
        return dispatches[self._choose_dispatch(ffn_rows)](ffn_rows, routing_weights, selected).reshape(shape)

    def _choose_dispatch(self, ffn_rows: torch.Tensor) -> str:
        if traced_for_every_shape():
            return "all"  # fixed shapes, no host sync, whatever linears the engine put in
        # "selected" needs the picks on the host: not with autograd, nor inside a compiled graph.
        can_select = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        rows = ffn_rows.shape[0]
        on_cpu = ffn_rows.device.type == "cpu"
        if self._dispatch == "auto" and can_select and on_cpu and 2 * rows * self.top_k <= self.num_experts:
            return "selected"  # decided before the per-expert checks below, which it does not need
        experts = list(self.experts.values())
        widens = all(_weights_usable_directly(e) for e in experts)
        if self._dispatch != "auto":
            if self._dispatch == "selected" and not can_select:
                return "all" if widens and not torch.is_grad_enabled() else "routed"
            if self._dispatch == "all" and not widens:
                return "routed"
            return self._dispatch
        if not torch.is_grad_enabled() and widens and rows <= (_DECODE_ROWS_CPU if on_cpu else _DECODE_ROWS):
            return "all"
        if not widens or on_cpu:
            # CPU: FLOP-bound, launches are cheap: routed measured faster even at adapter_dim 64.
            return "routed"
        # GPU: the routed dispatch costs ~4-5 ms more per layer fwd+bwd in launches and its
        # host sync (H100); the wide matmuls cost their (E - k) extra experts' FLOPs. Take
        # "all" while those extra fwd+bwd FLOPs stay under what ~3 ms of matmul does at
        # H100 speed (fp32 ~6e10 FLOP/ms, bf16/fp16 ~6e11), as measured on an H100.
        extra_per_token = 4 * (self.num_experts - self.top_k) * experts[0].adapter_down.out_features
        per_ms = 6e10 if ffn_rows.dtype == torch.float32 else 6e11
        return "all" if 3 * extra_per_token * ffn_rows.shape[-1] * rows <= 3 * per_ms else "routed"

    @staticmethod
    def _weighted_expert_output(
        expert: nn.Module, rows: torch.Tensor, weights: torch.Tensor, keep_scale: float | None = None
    ) -> torch.Tensor:
        """expert(rows) * weights ([rows, 1]); a `PescAdapter` scales its d-wide bottleneck instead of its H-wide output.

        `keep_scale`: the rows already had the adapter's dropout mask applied; its 1 / (1 - p)
        then scales the d-wide bottleneck rather than the H-wide rows (the same value: the
        projection is linear).
        """
        if type(expert) is PescAdapter:
            hidden = rows.to(expert.adapter_down.weight.dtype)
            if keep_scale is None:
                hidden = F.gelu(expert.adapter_down(expert.dropout(hidden)))
            else:
                hidden = F.gelu(expert.adapter_down(hidden) * keep_scale)
            hidden = hidden * (weights * expert.scaling).to(hidden.dtype)
            return expert.adapter_up(hidden)
        out = expert(rows)
        return out * weights.to(out.dtype)

    def _routed_forward(self, ffn_rows, routing_weights, selected):
        """ffn_rows plus each token's experts, computed in expert-sorted order."""
        experts = list(self.experts.values())
        mixed = routed_dispatch(ffn_rows, routing_weights, selected, experts, self._weighted_expert_output,
                                input_dropout=self._shared_active_dropout())
        return ffn_rows + mixed.to(ffn_rows.dtype)

    def _shared_active_dropout(self) -> float | None:
        """The adapters' dropout p where the routed dispatch applies it to all experts' rows at once.

        That is when every expert is a `PescAdapter` whose dropout is active with one shared p
        (always so for the experts this class builds, in training); otherwise None, and each
        expert applies its own dropout module.
        """
        experts = list(self.experts.values())
        if not all(type(e) is PescAdapter for e in experts):
            return None
        dropouts = {(e._modules["dropout"].p, e._modules["dropout"].training) for e in experts}
        if len(dropouts) != 1:
            return None
        p, training = dropouts.pop()
        return p if training and p > 0 else None

    def _selected_experts_forward(self, ffn_rows, routing_weights, selected):
        """ffn_rows plus each picked expert on the rows that picked it, grouped on the host; no autograd."""
        groups: dict[int, tuple[list[int], list[float]]] = {}
        for row, (picks, weights) in enumerate(zip(selected.tolist(), routing_weights.tolist())):
            for expert_index, weight in zip(picks, weights):
                rows, row_weights = groups.setdefault(expert_index, ([], []))
                rows.append(row)
                row_weights.append(weight)
        experts = list(self.experts.values())
        out = ffn_rows
        for expert_index in sorted(groups):
            rows, row_weights = groups[expert_index]
            expert = experts[expert_index]
            if ffn_rows.shape[0] == 1 and _weights_usable_directly(expert):
                down, up = _projection_weights(expert)
                if down.dtype == up.dtype == out.dtype:
                    # one token (batch-1 decoding): its weight, the scaling and the add ride on one addmm
                    hidden = F.gelu(F.linear(ffn_rows, down))
                    out = torch.addmm(out, hidden, up.t(), alpha=row_weights[0] * expert.scaling)
                    continue
            weights = torch.tensor(row_weights, dtype=routing_weights.dtype, device=ffn_rows.device).unsqueeze(-1)
            if len(rows) == ffn_rows.shape[0]:  # every row picked this expert: no gather
                out = out + self._weighted_expert_output(expert, ffn_rows, weights).to(out.dtype)
            else:
                row_index = torch.tensor(rows, device=ffn_rows.device)
                expert_out = self._weighted_expert_output(expert, ffn_rows.index_select(0, row_index), weights)
                out = out.index_add(0, row_index, expert_out.to(out.dtype))
        return out

    def _stacked_adapter_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' adapter_down as one [E*d, H] matrix, and their adapter_up transposed as another.

        Without autograd (generation) the stacks are kept and rebuilt only when a weight
        changes (its storage or in-place version), so decoding does not copy every
        expert's weights at every step; the price is one extra copy of the adapters.
        """
        experts = list(self.experts.values())
        pairs = [_projection_weights(e) for e in experts]
        weights = [down for down, _ in pairs] + [up for _, up in pairs]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return torch.cat(weights[: len(experts)]), torch.cat(weights[len(experts) :], dim=1).t()

        def stack():
            # adapter_up stacked as its transpose, contiguous, so that addmm reads it row-major
            return torch.cat(weights[: len(experts)]), torch.cat([w.t() for w in weights[len(experts) :]])

        if torch.compiler.is_compiling():
            return stack()  # afresh: a graph cannot keep the copies (their staleness check reads storage pointers)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        cache = self._stack_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._stack_cache = (key, *stack())
        return cache[1], cache[2]

    def _all_experts_forward(self, ffn_rows, routing_weights, selected):
        """ffn_rows plus every expert on every row, weighted by the (mostly zero) routing weights."""
        experts = list(self.experts.values())
        dtype = experts[0]._modules["adapter_down"].weight.dtype  # any linear: vLLM swaps them for its own
        scalings = {e.scaling for e in experts}
        if len(scalings) == 1:  # always so for PescMoEAdapter's own experts: no per-step host-to-device copy
            scaled = routing_weights * scalings.pop()
        else:
            scaled = routing_weights * routing_weights.new_tensor([e.scaling for e in experts])[selected]
        gates = torch.zeros(ffn_rows.shape[0], self.num_experts, device=ffn_rows.device, dtype=dtype).scatter_(
            1, selected, scaled.to(dtype)
        )
        if torch.compiler.is_compiling() and not _stack_inside_graph(ffn_rows.device):
            out, rows = ffn_rows, ffn_rows.to(dtype)
            for index, expert in enumerate(experts):
                hidden = F.gelu(expert.adapter_down(rows)) * gates[:, index : index + 1]
                out = out + expert.adapter_up(hidden).to(out.dtype)
            return out
        down, up_t = self._stacked_adapter_weights()  # [E*d, H], [E*d, H]
        hidden = F.gelu(F.linear(ffn_rows.to(dtype), down))
        hidden = (hidden.view(ffn_rows.shape[0], self.num_experts, -1) * gates.unsqueeze(-1)).view(ffn_rows.shape[0], -1)
        if ffn_rows.dtype == up_t.dtype:
            return torch.addmm(ffn_rows, hidden, up_t)  # the residual add fused into the matmul
        return ffn_rows + (hidden @ up_t).to(ffn_rows.dtype)


def _stack_inside_graph(device: torch.device) -> bool:
    """Whether a compiled decode step stacks the adapters afresh (two wide matmuls) or runs them expert by expert.

    Measured with `bench/generate.py --compile`. On CUDA (H200, h2048, bf16, CUDA graphs) a step
    is bound by kernel latency, not bytes: stacking (a copy of every adapter per step) took
    compiled PESC from 0.46 to 0.67x dense tokens/s at batch 1, and 0.54 to 0.66x at batch 8.
    On the CPU the step is bound by bytes, and the copy cost more than it saved (0.69 vs 0.78-0.83x).
    """
    return device.type == "cuda"


class PescMLP(nn.Module):
    """The dense gated FFN (same parameter names as the dense model) plus its PESC MoE adapter."""

    def __init__(self, dense_mlp: nn.Module, config: PescConfig, layer_idx: int = 0):
        super().__init__()
        self.gate_proj = dense_mlp.gate_proj
        self.up_proj = dense_mlp.up_proj
        self.down_proj = dense_mlp.down_proj
        self.act_fn = dense_mlp.act_fn
        self.moe_adapter = PescMoEAdapter(config, layer_idx)

    def dense_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe_adapter(hidden_states, self.dense_forward(hidden_states))


def check_gated_mlp(mlp: nn.Module, base_model_type: str) -> None:
    """Refuse FFNs that are not down(act(gate(x)) * up(x)) with separate linears."""
    missing = [name for name in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, name)]
    if missing:
        raise ValueError(
            f"PESC cannot wrap model family {base_model_type!r}: its FFN ({type(mlp).__name__}) has no "
            f"{', '.join(missing)}; PESC needs a gated MLP down(act(gate(x)) * up(x)) with separate linears"
        )
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name), nn.Linear):
            raise ValueError(
                f"PESC cannot wrap model family {base_model_type!r}: its FFN's {name} is a "
                f"{type(getattr(mlp, name)).__name__}, not a linear layer"
            )


@torch.no_grad()
def check_dense_equivalence(dense_mlp: nn.Module, pesc_mlp: PescMLP, base_model_type: str) -> None:
    """Prove on a random input that the family's FFN is exactly the gated formula PescMLP computes."""
    weight = dense_mlp.gate_proj.weight
    if weight.device.type == "meta" or weight.dim() != 2:
        return  # not materialised yet, or a DeepSpeed ZeRO-3 shard placeholder (empty until gathered)
    probe = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    dense_output = dense_mlp(probe)
    if not torch.isfinite(dense_output).all():
        return  # the weights are not loaded yet (uninitialised memory, as transformers 4.x leaves them): nothing to prove
    if not torch.equal(dense_output, pesc_mlp.dense_forward(probe)):
        raise ValueError(
            f"PESC cannot wrap model family {base_model_type!r}: its FFN ({type(dense_mlp).__name__}) computes "
            "something other than down(act(gate(x)) * up(x))"
        )


def init_expert_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Initialise a router, an adapter or one of its projections as PESC does (arXiv 2401.02731).

    Router and adapter_down: nn.Linear's default (kaiming uniform, a=sqrt 5); adapter_up: zero,
    so a freshly upcycled model computes exactly the dense model.
    A seeded `generator` makes the draw reproducible independently of the global RNG.
    """
    if isinstance(module, PescAdapter):
        init_expert_weights(module.adapter_down, generator)
        init_expert_weights(module.adapter_up, generator)
    elif isinstance(module, (PescRouter, AdapterDownProjection)):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    elif isinstance(module, AdapterUpProjection):
        nn.init.zeros_(module.weight)


class PescForCausalLM(MoEForCausalLM):
    """Causal LM of a dense family with every gated FFN replaced by a PESC MoE FFN (the family's
    attention, rope and caches run unchanged; moe_causal_lm.MoEForCausalLM)."""

    config_class = PescConfig
    method_label = "PESC"
    _no_split_modules = ["PescMLP"]

    def add_method_modules(self, layer: nn.Module, layer_idx: int, config: PescConfig) -> None:
        dense_mlp = getattr(layer, "mlp", None)
        if dense_mlp is None:
            raise ValueError(f"PESC cannot wrap model family {config.base_model_type!r}: its decoder layers have no `mlp`")
        check_gated_mlp(dense_mlp, config.base_model_type)
        layer.mlp = PescMLP(dense_mlp, config, layer_idx)
        if layer_idx == config.num_hidden_layers - 1:
            check_dense_equivalence(dense_mlp, layer.mlp, config.base_model_type)

    def init_method_module(self, module: nn.Module) -> bool:
        """PESC pieces get nn.Linear's default init with a zero adapter_up (their containers nothing)."""
        if isinstance(module, (PescRouter, AdapterDownProjection, AdapterUpProjection)):
            init_expert_weights(module)
        return isinstance(module, (PescRouter, AdapterDownProjection, AdapterUpProjection, PescMoEAdapter, PescAdapter))

    def aux_loss_coefficients(self) -> dict[str, float]:
        return {"aux_loss": self.config.router_aux_loss_coef}

    def compute_aux_losses(self, records, attention_mask, sample_values) -> dict:
        logits = tuple(record.logits for record in records)
        config = self.config
        return {"aux_loss": load_balancing_loss(logits, config.num_experts, config.num_experts_per_tok, attention_mask)}


class PescModel(MoEModel):
    """The PESC backbone without the LM head (what `AutoModel` and vLLM's Transformers backend load)."""

    config_class = PescConfig
    causal_lm_class = PescForCausalLM


__all__ = [
    "PescForCausalLM",
    "PescModel",
    "PescMLP",
    "PescMoEAdapter",
    "PescAdapter",
    "PescRouter",
    "load_balancing_loss",
    "init_expert_weights",
]
