"""LoRAMoE (Dou et al., arXiv 2312.09979): routed LoRA experts beside the FFN linears, with the
localized balancing constraint (LBC).

Shipped inside every LoRAMoE checkpoint, so it imports only torch and transformers.

Each site (by default `gate_proj`, `up_proj` and `down_proj` of every layer) keeps its frozen
linear W0 and gets its own router and N LoRA experts, all active for every token:
    y = W0 x + sum_i p_i(x) * B_i A_i dropout(x) * alpha / r,     p = softmax(W_route x)
with p computed in float32 and cast back to the experts' dtype, the router reading the undropped
x, as the official code (Ablustrund/LoRAMoE, peft/tuners/lora.py, class Linear) does. Init as
there: A_i and W_route kaiming-uniform (a=sqrt 5), B_i zero, so the model is the base model at
step 0.

The N experts are stored stacked, so a site runs them as two matmuls instead of the official
per-expert loop: `experts_A` [N*r, in] holds A_0 .. A_{N-1} one below the other, `experts_B`
[out, N*r] holds B_0 .. B_{N-1} side by side, and the routing weights scale the N*r-wide middle.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_loramoe import LBC_DIRECTIONS, LoramoeConfig
from .moe_causal_lm import MoEForCausalLM, MoEModel
from .moe_dropout import dropout_mask, zero_dropped
from .moe_routing import emit_routing_record
from .moe_sites import LINEAR_PARENTS, attach_sibling, linear_on

# Added to the denominator of the LBC, as the official code's cv_squared.
_LBC_EPS = 1e-10


class LoramoeRouter(nn.Linear):
    """A site's router: logits over its N experts, no bias (the official `lora_route`)."""


class LoramoeExpertsA(nn.Linear):
    """The N experts' A matrices stacked along the output rows: rows i*r .. (i+1)*r-1 are expert i's A."""


class LoramoeExpertsB(nn.Linear):
    """The N experts' B matrices side by side along the input columns; zero at init, so a new site adds nothing."""


class LoramoeExperts(nn.Module):
    """A router and N LoRA experts beside one linear: adds sum_i p_i * B_i A_i dropout(x) * alpha / r to its output."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float, dropout: float,
                 site: str = "", layer_idx: int = 0):  # fmt: skip
        super().__init__()
        self.site, self.layer_idx = site, layer_idx  # what its routing records say
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.router = LoramoeRouter(in_features, num_experts, bias=False)
        self.experts_A = LoramoeExpertsA(in_features, num_experts * rank, bias=False)
        self.experts_B = LoramoeExpertsB(num_experts * rank, out_features, bias=False)
        self.dropout = dropout  # p of the experts' input dropout: one mask over the site's input, all N experts share it

    def forward(self, x: torch.Tensor, linear_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the linear's output W0 x plus what the experts add; router logits [tokens, N] in the experts' dtype)."""
        rows = x.reshape(-1, x.shape[-1]).to(self.experts_A.weight.dtype)
        scaling = self.scaling
        # The fused matmuls read the linears' weights: only while they are ours (a serving engine may have put its
        # own linears in, whose weights are stored in another layout)
        own_linears = type(self.router) is LoramoeRouter and type(self.experts_A) is LoramoeExpertsA
        if own_linears and (self.dropout == 0 or not self.training):
            # router and experts read the same x: one matmul (and one input gradient) for both
            both = F.linear(rows, torch.cat([self.router.weight, self.experts_A.weight]))
            router_logits, hidden = both.split([self.num_experts, self.num_experts * self.rank], dim=-1)
        else:  # moe_dropout's mask (cheaper than F.dropout's), its keep scale moved onto the N*r-wide middle
            expert_input = rows
            if self.training and self.dropout:
                drop, keep_scale = dropout_mask(tuple(rows.shape), self.dropout, rows.device)
                expert_input, scaling = zero_dropped(rows, drop), scaling * keep_scale
            router_logits, hidden = self.router(rows), self.experts_A(expert_input)
        # float32 for half-precision experts (as the official code), float64 stays float64
        softmax_dtype = torch.promote_types(router_logits.dtype, torch.float32)
        weights = torch.softmax(router_logits, dim=-1, dtype=softmax_dtype).to(rows.dtype)
        scaled = (hidden.view(-1, self.num_experts, self.rank) * (weights * scaling).unsqueeze(-1)).view(hidden.shape)
        base = linear_output.reshape(-1, linear_output.shape[-1])
        if base.dtype == scaled.dtype and type(self.experts_B) is LoramoeExpertsB:
            # the add fused into the matmul: a separate half-precision add of the [tokens, out] output costs
            # more than the experts' matmuls on a CPU
            # B as a contiguous [N*r, out] copy (small): its gradient is then scaled^T @ grad, where a transposed
            # view would make autograd form grad^T @ scaled, which copies the [tokens, out] grad for half-precision GEMMs
            out = torch.addmm(base, scaled, self.experts_B.weight.t().contiguous())
        else:  # experts kept in float32 beside a half-precision (or 4-bit) linear, as QLoRA training has them
            out = base + self.experts_B(scaled).to(base.dtype)
        return out.view(linear_output.shape), router_logits

    def linear_output_hook(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The forward hook on the site's linear (moe_sites.attach_sibling): its output plus the experts'."""
        out, router_logits = self(args[0], output)
        emit_routing_record(self.site, self.layer_idx, router_logits)
        return out


@torch.no_grad()
def init_loramoe_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Initialise a site (or one of its parts) as the official code does; `generator` makes the draw reproducible.

    Router and A: nn.Linear's default (kaiming uniform, a=sqrt 5; each expert's A has the same
    fan-in as the stack); B: zero.
    """
    if isinstance(module, LoramoeExperts):
        for part in (module.router, module.experts_A, module.experts_B):
            init_loramoe_weights(part, generator)
    elif isinstance(module, (LoramoeRouter, LoramoeExpertsA)):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    elif isinstance(module, LoramoeExpertsB):
        nn.init.zeros_(module.weight)


# ---------------------------------------------------------------------------------------
# The localized balancing constraint
# ---------------------------------------------------------------------------------------
def official_lbc_groups(num_experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The official grouping, indexed by task type: type 0 (the other tasks) owns the last N/2 experts,
    type 1 (world knowledge) the first N/2."""
    half = num_experts // 2
    return tuple(range(half, 2 * half)), tuple(range(half))


def lbc_importance(groups: Sequence[Sequence[int]], num_experts: int, delta: float, sample_types: torch.Tensor,
                   direction: str = "official") -> torch.Tensor:
    """I [samples, N]: 1 + delta where expert n is in the group of sample m's type, else 1 - delta (`official`:
    the paper's Eq. 7 and the official code); `towards_own_group` swaps the two.

    cv^2(I * Q) is least where I * Q is flat, so a sample's routing is pulled towards the experts its row of
    I weighs less: off its own group for `official`, onto it for `towards_own_group`. A type with no group
    (outside 0 .. len(groups)-1) matches no expert, as in the official code.
    """
    if direction not in LBC_DIRECTIONS:
        raise ValueError(f"lbc direction must be one of {', '.join(LBC_DIRECTIONS)}, got {direction!r}")
    own, other = (1.0 + delta, 1.0 - delta) if direction == "official" else (1.0 - delta, 1.0 + delta)
    member = torch.zeros(len(groups) + 1, num_experts, dtype=torch.bool, device=sample_types.device)
    for task_type, experts in enumerate(groups):
        member[task_type, list(experts)] = True
    known = (sample_types >= 0) & (sample_types < len(groups))
    rows = torch.where(known, sample_types, len(groups)).long()  # unknown types -> the all-False last row
    return torch.where(member[rows], own, other).float()


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """var / (mean^2 + 1e-10) over all entries, unbiased variance, 0 for a single entry.

    The paper (Eq. 8) writes var/mean; its authors confirmed var/mean^2, the official code's
    squared coefficient of variation, is what they meant (Ablustrund/LoRAMoE issue #3).
    """
    values = values.float().reshape(-1)
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + _LBC_EPS)


def localized_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    sample_index: torch.Tensor,
    sample_types: torch.Tensor,
    groups: Sequence[Sequence[int]],
    delta: float,
    token_weight: torch.Tensor | None = None,
    reduction: str = "sum",
    direction: str = "official",
) -> torch.Tensor:
    """The LBC of every site, reduced over sites (`sum`: the official code; `mean`), without the coefficient beta.

    router_logits: one [tokens, N] tensor per site. sample_index [tokens]: which sample each token
    belongs to (0 .. samples-1). sample_types [samples]: each sample's task type, an index into
    `groups` (the experts each type should use). token_weight [tokens]: 1 for a real token, 0 for
    padding (None counts every token, as the official code does). `direction`: see `lbc_importance`.

    Per site: Q[m, n] = sum over sample m's tokens of p_n (float32 softmax), Z = I * Q with I from
    `lbc_importance`, loss = cv_squared(Z).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"lbc reduction must be 'sum' or 'mean', got {reduction!r}")
    if not router_logits:
        raise ValueError("localized_balancing_loss needs the router logits of at least one site")
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    sample_index = sample_index.to(device).long()
    importance = lbc_importance(groups, num_experts, delta, sample_types.to(device), direction)
    weight = None if token_weight is None else token_weight.to(device=device, dtype=torch.float32).reshape(-1, 1)
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.to(device).float(), dim=-1)
        if weight is not None:
            probs = probs * weight
        load = probs.new_zeros(importance.shape).index_add_(0, sample_index, probs)  # Q
        losses.append(cv_squared(importance * load))
    stacked = torch.stack(losses)
    return stacked.sum() if reduction == "sum" else stacked.mean()


class LoramoeForCausalLM(MoEForCausalLM):
    """Causal LM of a dense family with a LoRAMoE site (router + N LoRA experts) beside each of the `sites`
    linears of every layer (moe_causal_lm.MoEForCausalLM: the family's own modules run unchanged)."""

    config_class = LoramoeConfig
    method_label = "LoRAMoE"
    sample_fields = ("task_type",)

    def add_method_modules(self, layer: nn.Module, layer_idx: int, config: LoramoeConfig) -> None:
        for site in config.sites:
            linear = linear_on(layer, LINEAR_PARENTS[site], site, config.base_model_type, self.method_label)
            experts = LoramoeExperts(linear.in_features, linear.out_features, config.num_experts, config.expert_rank,
                                     config.expert_alpha, config.expert_dropout, site, layer_idx)  # fmt: skip
            attach_sibling(getattr(layer, LINEAR_PARENTS[site]), site, f"loramoe_{site}", experts, "output")

    def init_method_module(self, module: nn.Module) -> bool:
        """Routers and A kaiming-uniform, B zero (the official init); their containers nothing."""
        if isinstance(module, (LoramoeRouter, LoramoeExpertsA, LoramoeExpertsB)):
            init_loramoe_weights(module)
        return isinstance(module, (LoramoeRouter, LoramoeExpertsA, LoramoeExpertsB, LoramoeExperts))

    def aux_loss_coefficients(self) -> dict[str, float]:
        return {"lbc_loss": self.config.lbc_loss_coef}

    def compute_aux_losses(self, records, attention_mask, sample_values) -> dict:
        """`lbc_loss` when the batch's task types are given (never at inference, which has none)."""
        token_types = sample_values.get("task_type")
        if token_types is None:
            return {}
        sample_index = sample_values["sample_index"]
        num_samples = int(sample_index.max()) + 1
        sample_types = token_types.new_zeros(num_samples).scatter_(0, sample_index, token_types)
        token_weight = None
        if not self.config.lbc_include_padding and attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.numel() == sample_index.numel():
                token_weight = attention_mask.reshape(-1)
        config = self.config
        groups = config.lbc_groups or official_lbc_groups(config.num_experts)
        loss = localized_balancing_loss([record.logits for record in records], sample_index, sample_types, groups,
                                        config.lbc_delta, token_weight, config.lbc_reduction,
                                        config.lbc_direction)  # fmt: skip
        return {"lbc_loss": loss}


class LoramoeModel(MoEModel):
    """The LoRAMoE backbone without the LM head (what `AutoModel` and vLLM's Transformers backend load)."""

    config_class = LoramoeConfig
    causal_lm_class = LoramoeForCausalLM


__all__ = [
    "LoramoeForCausalLM",
    "LoramoeModel",
    "LoramoeExperts",
    "LoramoeExpertsA",
    "LoramoeExpertsB",
    "LoramoeRouter",
    "LBC_DIRECTIONS",
    "cv_squared",
    "init_loramoe_weights",
    "lbc_importance",
    "localized_balancing_loss",
    "official_lbc_groups",
]
