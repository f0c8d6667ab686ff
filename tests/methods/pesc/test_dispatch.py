"""Every dispatch of the MoE adapter computes the paper's sum, checked against a per-token loop.

The dispatches only reorder float operations (sorting, stacking, fused adds), so they are
compared to the plain formula with float64 weights and inputs, where a reordering moves
results by ~1e-16; the tolerance 1e-12 is far above that and far below any real bug.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pesc.methods.pesc.configuration_pesc import PescConfig
from pesc.methods.pesc.modeling_pesc import PescMoEAdapter

HIDDEN, ADAPTER_DIM, EXPERTS, TOP_K = 24, 8, 6, 2


def build_block(dropout: float = 0.0) -> PescMoEAdapter:
    config = PescConfig(
        base_model_type="llama",
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        adapter_dim=ADAPTER_DIM,
        moe_scaling=0.25,  # a power of two: w * s is exact in float32, as in float64
        adapter_dropout=dropout,
    )
    block = PescMoEAdapter(config).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return block


def reference(block: PescMoEAdapter, router_input: torch.Tensor, ffn_output: torch.Tensor, dropout=lambda h: h) -> torch.Tensor:
    """y_t = F_t + sum over the top-k experts i of w_i * s * up_i(gelu(down_i(dropout(F_t)))), token by token."""
    experts = list(block.experts.values())
    rows = []
    for x, h in zip(router_input.reshape(-1, HIDDEN), ffn_output.reshape(-1, HIDDEN)):
        logits = block.router.weight @ x
        top, chosen = torch.topk(logits, TOP_K)
        weights = torch.softmax(top.float(), dim=-1).double()
        row = h.clone()
        for weight, index in zip(weights, chosen.tolist()):
            expert = experts[index]
            row = row + weight * expert.scaling * (expert.adapter_up.weight @ F.gelu(expert.adapter_down.weight @ dropout(h)))
        rows.append(row)
    return torch.stack(rows).reshape(ffn_output.shape)


def assert_same_value_and_gradients(block, ffn_output, got, want):
    """got == want (1e-12), and so are the gradients of their square sums for ffn_output and every parameter (1e-10)."""
    wrt = [ffn_output, *block.parameters()]
    got_grads = torch.autograd.grad(got.square().sum(), wrt)
    want_grads = torch.autograd.grad(want.square().sum(), wrt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-10)


def inputs(tokens: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, tokens, HIDDEN, generator=generator, dtype=torch.float64),
        torch.randn(1, tokens, HIDDEN, generator=generator, dtype=torch.float64),
    )


@pytest.mark.parametrize("dispatch", ["auto", "routed", "all", "selected"])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_inference_dispatch_equals_the_formula(dispatch, tokens):
    block = build_block().eval()
    block._dispatch = dispatch
    router_input, ffn_output = inputs(tokens)
    with torch.no_grad():
        got = block(router_input, ffn_output)
    torch.testing.assert_close(got, reference(block, router_input, ffn_output), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dispatch", ["routed", "all"])
def test_training_dispatch_equals_the_formula_in_value_and_gradient(dispatch):
    block = build_block()
    block._dispatch = dispatch
    router_input, ffn_output = inputs(9)
    router_input.requires_grad_(True)
    ffn_output.requires_grad_(True)
    assert_same_value_and_gradients(block, ffn_output, block(router_input, ffn_output),
                                    reference(block, router_input, ffn_output))


@pytest.mark.parametrize("tokens", [1, 2])
def test_selected_dispatch_never_touches_an_idle_expert(tokens):
    """Idle experts' weights are NaN: reading them at all (even times a zero weight) would show."""
    block = build_block().eval()
    block._dispatch = "selected"
    router_input, ffn_output = inputs(tokens)
    with torch.no_grad():
        picked = set(torch.topk(block.router(router_input.reshape(tokens, -1)), TOP_K).indices.flatten().tolist())
        assert len(picked) < EXPERTS
        want = reference(block, router_input, ffn_output)
        for index, expert in enumerate(block.experts.values()):
            if index not in picked:
                expert.adapter_down.weight.fill_(float("nan"))
                expert.adapter_up.weight.fill_(float("nan"))
        got = block(router_input, ffn_output)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_selected_and_all_fall_back_to_routed_where_they_cannot_apply():
    block = build_block(dropout=0.5)  # training with dropout: each expert needs its own mask
    block._dispatch = "all"
    assert block._choose_dispatch(torch.zeros(4, HIDDEN)) == "routed"
    block._dispatch = "selected"
    assert block._choose_dispatch(torch.zeros(4, HIDDEN)) == "routed"  # autograd on: host grouping has no backward
    with torch.no_grad():
        assert block._choose_dispatch(torch.zeros(4, HIDDEN)) == "selected"


@pytest.mark.parametrize("dispatch", ["routed", "all", "selected"])
def test_experts_with_their_own_scalings_follow_the_formula(dispatch):
    block = build_block().eval()
    for index, expert in enumerate(block.experts.values()):
        expert.scaling = 2.0 ** -(index % 3)  # powers of two: exact in float32, as in float64
    block._dispatch = dispatch
    router_input, ffn_output = inputs(5)
    with torch.no_grad():
        got = block(router_input, ffn_output)
    torch.testing.assert_close(got, reference(block, router_input, ffn_output), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stack_inside_graph", [False, True], ids=["expert by expert (cpu)", "stacked (cuda)"])
@pytest.mark.parametrize("dispatch", ["auto", "all", "selected"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_compiled_decode_dispatch_is_one_graph_and_equals_the_formula(dispatch, tokens, stack_inside_graph, monkeypatch):
    """Inside torch.compile nothing may read the picks on the host or check the stacked copies."""
    from pesc.methods.pesc import modeling_pesc

    monkeypatch.setattr(modeling_pesc, "_stack_inside_graph", lambda device: stack_inside_graph)
    block = build_block().eval()
    block._dispatch = dispatch
    router_input, ffn_output = inputs(tokens)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(block)(router_input, ffn_output)
        got = torch.compile(block, backend="eager", fullgraph=True)(router_input, ffn_output)
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]
    torch.testing.assert_close(got, reference(block, router_input, ffn_output), rtol=1e-12, atol=1e-12)


def test_all_is_not_used_when_a_projection_is_wrapped():
    """"all" reads `.weight` directly; a wrapped projection (a peft LoRA layer, a quantized linear) must run as a module."""
    block = build_block().eval()
    expert = block.experts["expert_0"]
    wrapped = torch.nn.Linear(ADAPTER_DIM, HIDDEN, bias=False, dtype=torch.float64)
    with torch.no_grad():
        wrapped.weight.copy_(expert.adapter_up.weight)
    expert.adapter_up = wrapped
    block._dispatch = "all"
    router_input, ffn_output = inputs(3)
    with torch.no_grad():
        assert block._choose_dispatch(ffn_output.reshape(3, HIDDEN)) == "routed"
        got = block(router_input, ffn_output)
    torch.testing.assert_close(got, reference(block, router_input, ffn_output), rtol=1e-12, atol=1e-12)


def test_routed_dropout_applies_one_mask_per_token_and_expert_with_the_keep_scale(monkeypatch):
    """Training with adapter dropout: each (token, expert) row is masked once, and the kept elements scaled by 1/(1-p).

    The mask is replaced by one that drops the same hidden columns in every row, so the
    per-token reference can apply it without knowing the dispatch's row order.
    """
    from pesc.modeling import moe_dispatch

    dropped_columns = torch.tensor([0, 5, 6, 17])
    keep_scale = 1 / (1 - 0.25)  # a power-of-two ratio away from 1: exact in float64

    def column_mask(shape, p, device):
        assert p == 0.25
        drop = torch.zeros(shape, dtype=torch.bool, device=device)
        drop[:, dropped_columns] = True
        return drop, keep_scale

    monkeypatch.setattr(moe_dispatch, "dropout_mask", column_mask)
    block = build_block(dropout=0.25).train()
    router_input, ffn_output = inputs(9)
    ffn_output.requires_grad_(True)
    got = block(router_input, ffn_output)
    want = reference(block, router_input, ffn_output, dropout=lambda h: h.index_fill(-1, dropped_columns, 0) * keep_scale)
    assert_same_value_and_gradients(block, ffn_output, got, want)


@pytest.mark.parametrize("p, kind", [(0.05, "positions"), (0.125, "positions"), (0.5, "mask")])
def test_dropout_mask_drops_at_rate_p_independently(p, kind):
    from pesc.modeling.moe_dropout import dropout_mask

    torch.manual_seed(0)
    shape = (1000, 1001)  # an odd count: the last 32-bit draw is half used
    drop, keep_scale = dropout_mask(shape, p, torch.device("cpu"))
    if kind == "positions":  # the CPU's sparse form for small p: sorted, distinct flat indices in range
        assert drop.dtype == torch.int64 and drop.dim() == 1
        assert bool((drop.diff() > 0).all()) and 0 <= int(drop[0]) and int(drop[-1]) < math.prod(shape)
        drop = torch.zeros(math.prod(shape), dtype=torch.bool).index_fill_(0, drop, True).view(shape)
    assert drop.shape == shape and drop.dtype == torch.bool
    assert keep_scale == pytest.approx(1 / (1 - p), rel=1e-9)
    sigma = (p * (1 - p) / drop.numel()) ** 0.5
    assert abs(drop.float().mean().item() - p) < 6 * sigma
    rows = drop.float().mean(1)  # rows are not copies of each other
    assert rows.std().item() > 0.5 * (p * (1 - p) / shape[1]) ** 0.5
    # neither the first nor the last elements are favoured (the draw of positions stops exactly at the end)
    for part in (drop[:100], drop[-100:]):
        assert abs(part.float().mean().item() - p) < 6 * (p * (1 - p) / part.numel()) ** 0.5
    again, _ = dropout_mask(shape, p, torch.device("cpu"))
    assert not torch.equal(drop, again)


@pytest.mark.parametrize("numel", [1, 7, 64])
def test_drop_positions_of_small_tensors_can_be_empty_and_stay_in_range(numel):
    """Few elements: often no drop at all (0.9**7 ~ 0.48), never an index past the end."""
    from pesc.modeling.moe_dropout import _drop_positions

    torch.manual_seed(0)
    counts = []
    for _ in range(400):
        positions = _drop_positions(numel, 0.1)
        assert positions.numel() == 0 or (int(positions[-1]) < numel and bool((positions.diff() > 0).all()))
        counts.append(positions.numel())
    mean, sigma = numel * 0.1, (numel * 0.1 * 0.9 / 400) ** 0.5
    assert abs(sum(counts) / 400 - mean) < 6 * sigma


def test_zero_dropped_is_the_same_for_positions_and_mask_with_gradients():
    from pesc.modeling.moe_dropout import zero_dropped

    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    mask = torch.rand(6, 5) < 0.3
    positions = mask.reshape(-1).nonzero().squeeze(1)
    results = []
    for drop in (mask, positions):
        x.grad = None
        out = zero_dropped(x * 1.0, drop)
        out.backward(torch.arange(30.0).view(6, 5))
        results.append((out.detach(), x.grad.clone()))
        assert torch.equal(zero_dropped(x.detach().clone(), drop, in_place=True), out.detach())
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][0] == 0, mask | (x == 0))


def test_experts_with_different_dropouts_keep_their_own_masks():
    block = build_block(dropout=0.25).train()
    assert block._shared_active_dropout() == 0.25
    block.experts["expert_1"].dropout.p = 0.5
    assert block._shared_active_dropout() is None
    assert build_block(dropout=0.25).eval()._shared_active_dropout() is None
    assert build_block(dropout=0.0).train()._shared_active_dropout() is None
