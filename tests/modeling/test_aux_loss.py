"""The load-balancing loss (docs/model.md, "The load-balancing loss"): E * sum_i f_i * P_i per layer, padding left out, mean over layers."""

import pytest
import torch

from pesc.modeling.moe_routing import load_balancing_loss

# Four experts, top-2. Rows 0 and 1 route to {0, 1} and {2, 3}; their mean softmax is uniform.
BALANCED = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
SKEWED = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 4.0, 0.0, 0.0]])


def test_perfect_balance_gives_one():
    assert load_balancing_loss((BALANCED,), num_experts=4, top_k=2).item() == pytest.approx(1.0, abs=1e-6)


def test_skewed_routing_matches_the_formula_by_hand():
    probs = torch.softmax(SKEWED[0], dim=-1)
    # f = (0.5, 0.5, 0, 0): every token's top-2 is {0, 1}; P = the (identical) rows' softmax.
    expected = 4 * (0.5 * probs[0] + 0.5 * probs[1])
    loss = load_balancing_loss((SKEWED,), num_experts=4, top_k=2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() > 1.5


def test_layers_are_averaged():
    loss = load_balancing_loss((BALANCED, SKEWED), num_experts=4, top_k=2)
    single = load_balancing_loss((SKEWED,), num_experts=4, top_k=2)
    assert loss.item() == pytest.approx((1.0 + single.item()) / 2, rel=1e-6)


def test_padding_tokens_are_ignored():
    # batch 2 x seq 2: sample 0 = the balanced rows, sample 1 = two skewed padding rows.
    logits = torch.cat([BALANCED, SKEWED])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert load_balancing_loss((logits,), 4, 2, attention_mask=mask).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss((logits,), 4, 2).item() > 1.1


def test_left_padding_during_generation_uses_the_last_mask_columns():
    # With a cache, the logits cover only the new token while the mask covers the whole prefix.
    logits = BALANCED
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert load_balancing_loss((logits,), 4, 2, attention_mask=mask).item() == pytest.approx(1.0, abs=1e-6)


def test_gradient_reaches_the_router_logits():
    logits = SKEWED.clone().requires_grad_(True)
    load_balancing_loss((logits,), 4, 2).backward()
    assert logits.grad.abs().sum() > 0


def _balance_loss_by_hand(router_logits, keep, num_experts, top_k) -> float:
    """docs/model.md's formula in float64, token by token: E * sum_i f_i * P_i over the kept tokens, averaged over layers."""
    layers = []
    for logits in router_logits:
        tokens = [row for row, kept in zip(logits.double(), keep) if kept]
        routed, probability = [0.0] * num_experts, [0.0] * num_experts
        for row in tokens:
            for i in sorted(range(num_experts), key=lambda i: -row[i].item())[:top_k]:
                routed[i] += 1.0 / (len(tokens) * top_k)
            for i, p in enumerate(torch.softmax(row, dim=-1).tolist()):
                probability[i] += p / len(tokens)
        layers.append(num_experts * sum(f * p for f, p in zip(routed, probability)))
    return sum(layers) / len(layers)


def test_model_leaves_padding_out_of_the_balance_loss():
    """A batch with left and right padding: the model's aux_loss is the formula over the real tokens only.

    Tolerance 1e-6: the model sums in float32 (values of order 1), the reference in float64.
    """
    import pesc
    from pesc.testing import build_tiny_dense

    model = pesc.upcycle(build_tiny_dense("llama"), num_experts=4, top_k=2, adapter_dim=8, seed=0).eval()
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                    output_router_logits=True)
    keep = mask.reshape(-1).bool().tolist()
    expected = _balance_loss_by_hand(out.router_logits, keep, 4, 2)
    assert abs(out.aux_loss.item() - expected) <= 1e-6
    # the padded rows route differently: counting them would change the loss far beyond the tolerance
    assert abs(_balance_loss_by_hand(out.router_logits, [True] * len(keep), 4, 2) - expected) > 1e-3
