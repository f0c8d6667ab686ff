"""Counting over routing records: expert load, router entropy, expert-group shares.

Load of expert e in one layer, over a set of tokens (each load row sums to 1):
- top-k router (`selected` given): the share of the token-to-expert assignments that went to e
  (count of e in `selected` / (tokens * k)), which is what the balance loss and training's logs count;
- dense router (`selected` None, every expert active): the mean softmax probability of e.
Router entropy: the mean over tokens of the entropy (nats) of softmax(logits), for both kinds;
ln(E) is a uniform router, 0 a router sure of one expert.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from pesc.errors import PescError
from pesc.modeling.moe_routing import RoutingRecord


def routing_load(record: RoutingRecord, keep: torch.Tensor | None) -> torch.Tensor:
    """How much routing each expert of one site got: top-k picks (sparse) or softmax weight (dense), summed
    over the tokens `keep` marks (all if None). Training's logs and `pesc routes` both count with it."""
    logits = record.logits if keep is None else record.logits[keep.to(record.logits.device)]
    experts = logits.shape[-1]
    if record.selected is None:
        return torch.softmax(logits.float(), dim=-1).sum(0).cpu().double()
    selected = record.selected if keep is None else record.selected[keep.to(record.selected.device)]
    return torch.bincount(selected.reshape(-1), minlength=experts).cpu().double()


def entropy_sum(record: RoutingRecord) -> float:
    """The router entropy (nats) of the record's tokens, summed over tokens."""
    probs = torch.softmax(record.logits.double(), dim=-1)
    return float(-torch.xlogy(probs, probs).sum())


@dataclass
class _Sums:
    tokens: int = 0
    load: torch.Tensor | None = None
    entropy: float = 0.0


@dataclass
class SiteStats:
    """One site kind's numbers: per task, per layer (in `layers` order)."""

    num_experts: int
    top_k: int | None  # None: a dense router
    layers: list[int]
    tokens: dict[str, int] = field(default_factory=dict)  # per task
    load: dict[str, list[list[float]]] = field(default_factory=dict)  # per task: [layer][expert]
    entropy: dict[str, list[float]] = field(default_factory=dict)  # per task: [layer]


class RoutingTally:
    """Running sums over batches, per task, site and layer: nothing per token is kept."""

    def __init__(self):
        self._sums: dict[tuple[str, str, int], _Sums] = defaultdict(_Sums)
        self._kinds: dict[str, tuple[int, int | None]] = {}

    def add(self, task: str, records: list[RoutingRecord]) -> None:
        for record in records:
            kind = (record.logits.shape[-1], None if record.selected is None else record.selected.shape[-1])
            if self._kinds.setdefault(record.site, kind) != kind:
                raise ValueError(f"site {record.site!r} has (experts, top-k) {kind}, before {self._kinds[record.site]}")
            sums = self._sums[(task, record.site, record.layer)]
            sums.tokens += record.logits.shape[0]
            load = routing_load(record, None)  # training's count: assignments (top-k) or summed probability (dense)
            sums.load = load if sums.load is None else sums.load + load
            sums.entropy += entropy_sum(record)

    def stats(self) -> dict[str, SiteStats]:
        """{site: SiteStats}, sites and layers sorted, tasks in the order they were added."""
        result = {}
        for site, (num_experts, top_k) in sorted(self._kinds.items()):
            keys = [key for key in self._sums if key[1] == site]
            tasks = list(dict.fromkeys(task for task, _, _ in keys))
            stats = SiteStats(num_experts, top_k, sorted({layer for _, _, layer in keys}))
            for task in tasks:
                rows = [self._sums[(task, site, layer)] for layer in stats.layers]
                stats.tokens[task] = rows[0].tokens
                assignments = top_k or 1  # per token: the load sum of a token is k (top-k) or 1 (dense)
                stats.load[task] = [(row.load / max(row.tokens * assignments, 1)).tolist() for row in rows]
                stats.entropy[task] = [row.entropy / max(row.tokens, 1) for row in rows]
            result[site] = stats
        return result


def check_expert_range(expert_groups: dict[str, list[int]], num_experts: int, site: str) -> None:
    """Every index of every group names an expert of `site`."""
    for name, experts in expert_groups.items():
        for expert in experts:
            if not 0 <= expert < num_experts:
                raise PescError(f"expert group {name!r}: expert {expert} does not exist ({site} routes "
                                f"{num_experts} experts, 0 to {num_experts - 1})")


def group_shares(stats: SiteStats, expert_groups: dict[str, list[int]]) -> dict[str, dict[str, list[float]]]:
    """{task: {group: [per layer share]}}: the router mass (the load) on each group's experts.

    For a dense router this is the mean softmax mass on the group (LoRAMoE's figure of knowledge vs
    task experts per task type); for a top-k router the share of assignments that went to the group.
    """
    return {
        task: {name: [sum(row[e] for e in experts) for row in load] for name, experts in expert_groups.items()}
        for task, load in stats.load.items()
    }
