"""Parameter summaries computed from a config alone on the meta device, for any method (PESC adds its own view:
pesc/methods/pesc/summary.py)."""

from dataclasses import asdict, dataclass

import torch


class Counts:
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


def human_count(count: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


@dataclass(frozen=True)
class MethodSummary(Counts):
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
        model = method.model_class_for(config)(config)
    total = sum(p.numel() for p in model.parameters())
    added = {n: p.numel() for n, p in model.named_parameters() if method.is_added(n)}
    prefixes = method.layer_prefixes(config)
    inactive = sum(
        method.inactive_params_per_token(config, {n[len(p):]: c for n, c in added.items() if n.startswith(p)})
        for p in prefixes
    )
    return MethodSummary(
        method=method.name,
        base_model_type=config.base_model_type,
        num_layers=len(prefixes),
        hidden_size=config.hidden_size,
        settings=method.config_settings(config),
        dense_params=total - sum(added.values()),
        total_params=total,
        active_params=total - inactive,
        trainable_params=sum(added.values()),
    )
