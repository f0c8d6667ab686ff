"""LoRAMoE's site module and localized balancing constraint against the paper's formulas
(docs/methods/loramoe.md: "The layer", "The localized balancing constraint"), written here token by token and expert
by expert in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from pesc.methods.loramoe import modeling_loramoe
from pesc.methods.loramoe.modeling_loramoe import (
    LoramoeExperts,
    init_loramoe_weights,
    localized_balancing_loss,
    official_lbc_groups,
)
from helpers import lbc_by_hand

IN, OUT, N, R, ALPHA = 12, 20, 6, 4, 32.0


def _site(seed: int = 0, dropout: float = 0.0) -> LoramoeExperts:
    """A float64 site with the official init and then a random non-zero B (else the experts add nothing)."""
    site = LoramoeExperts(IN, OUT, N, R, ALPHA, dropout).double()
    generator = torch.Generator().manual_seed(seed)
    init_loramoe_weights(site, generator)
    with torch.no_grad():
        site.experts_B.weight.normal_(0.0, 0.1, generator=generator)
    return site


def _expert_matrices(site: LoramoeExperts, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert i's (A_i [r, in], B_i [out, r]) read out of the stacked weights."""
    return site.experts_A.weight[i * R : (i + 1) * R], site.experts_B.weight[:, i * R : (i + 1) * R]


@torch.no_grad()
def _reference_added(site: LoramoeExperts, x: torch.Tensor) -> torch.Tensor:
    """sum_i p_i(x) * B_i A_i x * alpha / r, one token and one expert at a time (no dropout)."""
    rows = x.reshape(-1, IN)
    out = torch.zeros(rows.shape[0], OUT, dtype=torch.float64)
    for t, token in enumerate(rows):
        logits = [float(site.router.weight[i] @ token) for i in range(N)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        for i in range(N):
            a, b = _expert_matrices(site, i)
            out[t] += exps[i] / sum(exps) * (b @ (a @ token)) * (ALPHA / R)
    return out.reshape(*x.shape[:-1], OUT)


def test_forward_is_the_routed_sum_of_every_expert():
    site = _site().eval()
    x = torch.randn(3, 5, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = torch.randn(3, 5, OUT, dtype=torch.float64)
    out, logits = site(x, base)
    added = out - base
    assert out.shape == (3, 5, OUT)
    torch.testing.assert_close(added, _reference_added(site, x), rtol=1e-12, atol=1e-12)
    # The site computes the logits in one matmul with the experts' A (router rows stacked on top), the reference
    # alone: two kernels summing the IN products of each logit in their own order, which differ by rounding on
    # some CPUs (2.2e-16 seen). Each float64 sum is within IN * u * sum_j |x_j w_j| of the exact one (u = 2^-53),
    # so the two are within twice that; a wrong router row or token is off by order |x| |w| ~ 1.
    rows, weight = x.reshape(-1, IN), site.router.weight
    bound = 2 * IN * 2.0**-53 * (rows.abs() @ weight.abs().T)
    assert ((logits - rows @ weight.T).abs() <= bound).all()
    assert added.abs().max() > 0.1  # the experts contribute: the comparison is not of two zeros


def fixed_dropout(monkeypatch, drop, keep_scale):
    """moe_dropout.dropout_mask, as the site calls it, replaced by a known mask; returns the shapes it was asked for."""
    asked = []

    def mask(shape, p, device):
        asked.append(tuple(shape))
        return drop, keep_scale

    monkeypatch.setattr(modeling_loramoe, "dropout_mask", mask)
    return asked


def test_router_reads_undropped_input_and_experts_the_dropped_one(monkeypatch):
    """With a mask that drops everything, the experts add exactly zero while the router still sees x."""
    site = _site(dropout=0.5).train()
    x = torch.randn(7, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fixed_dropout(monkeypatch, torch.ones(7, IN, dtype=torch.bool), 2.0)
    base = torch.randn(7, OUT, dtype=torch.float64)
    out, logits = site(x, base)
    assert torch.equal(out, base)
    assert torch.equal(logits, F.linear(x, site.router.weight))
    assert logits.abs().max() > 0


def test_training_dropout_masks_the_experts_input_once(monkeypatch):
    """Train mode, dropout 0.5: the router sees x; every expert sees the same dropped x (one mask a site), scaled by 1/(1-p)."""
    site = _site(dropout=0.5).train()
    x = torch.randn(9, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    drop = torch.rand(9, IN, generator=torch.Generator().manual_seed(4)) < 0.5
    asked = fixed_dropout(monkeypatch, drop, 2.0)
    base = torch.zeros(9, OUT, dtype=torch.float64)
    out, logits = site(x, base)
    assert asked == [(9, IN)]  # one mask over the site's input, not one per expert
    dropped = x.masked_fill(drop, 0) * 2.0
    with torch.no_grad():
        p = torch.softmax(x @ site.router.weight.T, dim=-1)
        expected = sum(p[:, i : i + 1] * (dropped @ _expert_matrices(site, i)[0].T) @ _expert_matrices(site, i)[1].T
                       for i in range(N)) * (ALPHA / R)  # fmt: skip
        undropped = sum(p[:, i : i + 1] * (x @ _expert_matrices(site, i)[0].T) @ _expert_matrices(site, i)[1].T
                        for i in range(N)) * (ALPHA / R)  # fmt: skip
    assert (expected - undropped).abs().max() > 0.1  # the mask matters
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(logits.detach(), F.linear(x, site.router.weight))  # with dropout: the router's own matmul


def test_official_init_adds_nothing_and_draws_kaiming_uniform():
    site = LoramoeExperts(IN, OUT, N, R, ALPHA, 0.05)
    init_loramoe_weights(site, torch.Generator().manual_seed(5))
    x, base = torch.randn(4, IN), torch.randn(4, OUT)
    out, _ = site(x, base)
    assert torch.equal(out, base)
    # The same draws, independently: router first, then A (each expert's A has fan-in IN, like the stack).
    generator = torch.Generator().manual_seed(5)
    router, a = torch.empty(N, IN), torch.empty(N * R, IN)
    torch.nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=generator)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    assert torch.equal(site.router.weight, router)
    assert torch.equal(site.experts_A.weight, a)
    assert site.experts_A.weight.abs().max() <= 1 / math.sqrt(IN)  # kaiming a=sqrt 5: bound 1/sqrt(fan_in)


def test_gradient_reaches_router_and_experts():
    site = _site().train()
    x = torch.randn(6, IN, dtype=torch.float64)
    out, _ = site(x, torch.zeros(6, OUT, dtype=torch.float64))
    out.square().sum().backward()
    for part in (site.router, site.experts_A, site.experts_B):
        assert part.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# The localized balancing constraint
# ---------------------------------------------------------------------------------------
def sample_index_of_tokens(batch: int, seq: int) -> torch.Tensor:
    """A padded batch's sample of each token: row b is sample b."""
    return torch.arange(batch).repeat_interleave(seq)


@pytest.mark.parametrize("direction", ["official", "towards_own_group"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("include_padding", [False, True])
@pytest.mark.parametrize(
    "groups, types",
    [
        (((3, 4, 5), (0, 1, 2)), [0, 1, 1, 0]),  # the official halves: type 1 = first three experts
        (((0, 1), (2, 3), (4, 5)), [2, 0, 1, 2]),  # three task types, explicit groups
        (((5,), (0, 2, 4)), [1, 0, 1, 7]),  # uneven groups; type 7 has no group (all 1 - delta)
    ],
)
def test_lbc_matches_the_formula_token_by_token(groups, types, include_padding, reduction, direction):
    """Three sites, a padded batch of four samples. Tolerance rel 1e-5: the loss sums in float32."""
    generator = torch.Generator().manual_seed(3)
    batch, seq = len(types), 5
    site_logits = [torch.randn(batch * seq, N, generator=generator) * 2 for _ in range(3)]
    mask = torch.ones(batch, seq)
    mask[0, 3:] = 0
    mask[2, :2] = 0
    sample_of_token = sample_index_of_tokens(batch, seq)
    keep = [True] * (batch * seq) if include_padding else mask.reshape(-1).bool().tolist()
    loss = localized_balancing_loss(
        site_logits, sample_of_token, torch.tensor(types), groups, delta=0.1,
        token_weight=None if include_padding else mask.reshape(-1), reduction=reduction, direction=direction,
    )  # fmt: skip
    expected = lbc_by_hand(site_logits, sample_of_token.tolist(), types, groups, 0.1, keep, reduction, direction)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


def test_official_groups_give_type_1_the_first_half():
    """The official code's mask: concat((type == 1).repeat(N/2), (type == 0).repeat(N/2)) along the experts."""
    assert official_lbc_groups(6) == ((3, 4, 5), (0, 1, 2))
    assert official_lbc_groups(2) == ((1,), (0,))


def test_padding_changes_the_lbc_only_when_included():
    """Same real tokens, different padding logits: the default (padding left out) does not see them."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2 * 4, N, generator=generator)
    other = logits.clone()
    other[6:] = torch.randn(2, N, generator=generator) * 5  # sample 1's last two tokens are padding
    mask = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0])
    args = (sample_index_of_tokens(2, 4), torch.tensor([0, 1]), official_lbc_groups(N), 0.1)
    excluded = [localized_balancing_loss([x], *args, token_weight=mask) for x in (logits, other)]
    included = [localized_balancing_loss([x], *args) for x in (logits, other)]
    assert excluded[0].item() == excluded[1].item()
    assert included[0].item() != pytest.approx(included[1].item(), rel=1e-3)


def test_lbc_is_zero_for_uniform_routing_without_delta():
    uniform = torch.zeros(4 * 3, N)  # equal logits: p = 1/N for every token; four samples of three tokens
    loss = localized_balancing_loss([uniform] * 3, sample_index_of_tokens(4, 3), torch.tensor([0, 1, 0, 1]),
                                    official_lbc_groups(N), delta=0.0)  # fmt: skip
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def _routing_with_shared_load(share: float) -> torch.Tensor:
    """Logits of one knowledge sample and one task sample (two tokens each) that put `share` of each
    sample's routing weight on the other type's experts, spread evenly (official groups, N = 6)."""
    knowledge, task = official_lbc_groups(N)[1], official_lbc_groups(N)[0]
    rows = []
    for own, other in ((knowledge, task), (task, knowledge)):
        p = torch.zeros(N, dtype=torch.float64)
        p[list(own)] = (1 - share) / len(own)
        p[list(other)] = share / len(other)
        rows += [p.log()] * 2
    return torch.stack(rows).float()


def test_lbc_grows_as_load_moves_to_the_other_groups_samples():
    """With delta, Z = I * Q is flat where each sample gives a share (1 + delta) / 2 of its weight to the
    other type's experts (there (1 + delta) * (1 - s) = (1 - delta) * s): the LBC is zero there and grows
    strictly as the load moves further onto the other group's samples (and as it moves back).
    """
    delta = 0.1
    args = (sample_index_of_tokens(2, 2), torch.tensor([1, 0]), official_lbc_groups(N), delta)
    balanced = (1 + delta) / 2
    assert localized_balancing_loss([_routing_with_shared_load(balanced)], *args).item() == pytest.approx(0, abs=1e-10)
    towards_other = [balanced + step for step in (0.05, 0.15, 0.25, 0.35, 0.44)]
    losses = [localized_balancing_loss([_routing_with_shared_load(s)], *args).item() for s in towards_other]
    assert all(b > a for a, b in zip(losses, losses[1:])) and losses[0] > 0
    back_to_own = [balanced - step for step in (0.05, 0.25, 0.5)]
    losses = [localized_balancing_loss([_routing_with_shared_load(s)], *args).item() for s in back_to_own]
    assert all(b > a for a, b in zip(losses, losses[1:])) and losses[0] > 0


@pytest.mark.parametrize("direction, own_group_sign", [("official", 1), ("towards_own_group", -1)])
def test_lbc_alone_pulls_uniform_routing_the_way_its_direction_says(direction, own_group_sign):
    """official: at uniform routing Z is larger on a sample's own group ((1 + delta) Q), so a descent step
    on the LBC lowers the own group's logits: the constraint balances Z, it does not pull samples to their
    group (docs/methods/loramoe.md). towards_own_group weighs the own group 1 - delta: the step raises them."""
    logits = torch.zeros(4, N, requires_grad=True)  # a knowledge sample (type 1), then a task sample, 2 tokens each
    localized_balancing_loss([logits], sample_index_of_tokens(2, 2), torch.tensor([1, 0]), official_lbc_groups(N),
                             delta=0.1, direction=direction).backward()  # fmt: skip
    knowledge_rows, task_rows = logits.grad[:2] * own_group_sign, logits.grad[2:] * own_group_sign
    assert (knowledge_rows[:, :3] > 0).all() and (knowledge_rows[:, 3:] < 0).all()
    assert (task_rows[:, 3:] > 0).all() and (task_rows[:, :3] < 0).all()


def test_lbc_of_a_single_entry_is_zero_and_reductions_differ():
    one = localized_balancing_loss([torch.zeros(3, 1)], torch.zeros(3, dtype=torch.long), torch.tensor([0]),
                                   ((0,),), delta=0.1)  # fmt: skip
    assert one.item() == 0.0
    logits = [torch.randn(8, N, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    args = (sample_index_of_tokens(2, 4), torch.tensor([0, 1]), official_lbc_groups(N), 0.1)
    total = localized_balancing_loss(logits, *args, reduction="sum")
    mean = localized_balancing_loss(logits, *args, reduction="mean")
    assert total.item() == pytest.approx(2 * mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        localized_balancing_loss(logits, *args, reduction="max")


def test_lbc_gradient_reaches_the_router_logits():
    logits = torch.randn(8, N, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    loss = localized_balancing_loss([logits], sample_index_of_tokens(2, 4), torch.tensor([0, 1]),
                                    official_lbc_groups(N), delta=0.1)  # fmt: skip
    loss.backward()
    assert logits.grad.abs().sum() > 0
