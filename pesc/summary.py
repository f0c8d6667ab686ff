"""Parameter summaries computed from a config alone on the meta device: PESC's own, and any method's."""

from dataclasses import asdict, dataclass

import torch

from pesc.modeling import PescConfig, PescForCausalLM


class _Counts:
    """What every summary shows: total, active per token, trainable and dense-base parameter counts."""

    def as_dict(self) -> dict:
        return asdict(self)

    def count_lines(self, trainable: str, what: str = "") -> list[str]:
        """The count lines; `trainable` labels the trainable count, `what` says what it holds."""
        return [
            f"total params      {self.total_params:,} ({human_count(self.total_params)})",
            f"active per token  {self.active_params:,} ({human_count(self.active_params)})",
            f"{trainable:<18}{self.trainable_params:,} ({human_count(self.trainable_params)}{what})",
            f"dense base        {self.dense_params:,} ({human_count(self.dense_params)})",
        ]


@dataclass(frozen=True)
class ParameterSummary(_Counts):
    base_model_type: str
    num_layers: int
    hidden_size: int
    num_experts: int
    top_k: int
    adapter_dim: int
    moe_scaling: float
    dense_params: int
    expert_params_per_layer: int
    router_params_per_layer: int
    total_params: int
    active_params: int
    trainable_params: int

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        return [
            f"architecture      PESC over {self.base_model_type}: {self.num_layers} layers, hidden {self.hidden_size}",
            f"experts           {self.num_experts} per layer, top-{self.top_k}, adapter_dim {self.adapter_dim}, "
            f"moe_scaling {self.moe_scaling}",
            *self.count_lines("trainable (MoE)", ": adapters + routers"),
        ]


def human_count(count: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def summarize(config: PescConfig) -> ParameterSummary:
    """Count parameters by building the model on the meta device: no memory, no weights read."""
    with torch.device("meta"):
        model = PescForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    first_block = model.model.layers[0].mlp.moe_adapter
    router = first_block.router.weight.numel()
    per_expert = sum(p.numel() for p in next(iter(first_block.experts.values())).parameters())
    layers = len(model.model.layers)
    experts_total = layers * (router + config.num_experts * per_expert)
    return ParameterSummary(
        base_model_type=config.base_model_type,
        num_layers=layers,
        hidden_size=config.hidden_size,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        adapter_dim=config.adapter_dim,
        moe_scaling=config.moe_scaling,
        dense_params=total - experts_total,
        expert_params_per_layer=config.num_experts * per_expert,
        router_params_per_layer=router,
        total_params=total,
        active_params=total - layers * (config.num_experts - config.num_experts_per_tok) * per_expert,
        trainable_params=experts_total,
    )


@dataclass(frozen=True)
class MethodSummary(_Counts):
    """Any method's counts: its settings, and total / active per token / trainable (added) parameters."""

    method: str
    base_model_type: str
    num_layers: int
    hidden_size: int
    settings: dict
    dense_params: int
    total_params: int
    active_params: int
    trainable_params: int

    def lines(self) -> list[str]:
        settings = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        return [
            f"architecture      {self.method} over {self.base_model_type}: {self.num_layers} layers, "
            f"hidden {self.hidden_size}",
            f"settings          {settings}",
            *self.count_lines("trainable (added)"),
        ]


def summarize_method(method, config) -> MethodSummary:
    """Build the method's model on the meta device and count; the method says what a token leaves idle."""
    with torch.device("meta"):
        model = method.model_class(config)
    total = sum(p.numel() for p in model.parameters())
    added = {n: p.numel() for n, p in model.named_parameters() if method.is_added(n)}
    layer_zero = {n.split("model.layers.0.", 1)[1]: c for n, c in added.items() if n.startswith("model.layers.0.")}
    return MethodSummary(
        method=method.name,
        base_model_type=config.base_model_type,
        num_layers=len(model.model.layers),
        hidden_size=config.hidden_size,
        settings=method.config_settings(config),
        dense_params=total - sum(added.values()),
        total_params=total,
        active_params=total - len(model.model.layers) * method.inactive_params_per_token(config, layer_zero),
        trainable_params=sum(added.values()),
    )
