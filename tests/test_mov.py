"""MoV (arXiv 2309.05444): the layer against a per-token, per-head, per-expert float64 reference written here.

The layer routes in float32 (the paper's rule), so it cannot match a float64 reference
bit for bit: the tolerance (rtol 1e-5, atol 1e-6 on values of order 1) is a few float32 ulps
of accumulated rounding, far below the effect of any wrong routing or merge (order 1e-2).
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding

from pesc.modeling.modeling_mov import MoVScaling

CLOSE = dict(rtol=1e-5, atol=1e-6)


def trained_like(width: int, experts: int, heads: int, seed: int) -> MoVScaling:
    """A MoV site with the official init, then vectors moved off ones (as training leaves them)."""
    site = MoVScaling(width, experts, heads)
    generator = torch.Generator().manual_seed(seed)
    site.reset_parameters(generator)
    with torch.no_grad():
        site.router.weight.mul_(20)  # peaked routing: a wrong expert or head pairing shows
        site.vectors.add_(torch.randn(site.vectors.shape, generator=generator))
    return site


def reference_mov(activation: torch.Tensor, router: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """y[t, h] = a[t, h] * sum_e p[t, h, e] * l[h, e] with p = softmax_e(a[t, h] . router[e]); float64 loops."""
    heads, experts, width = vectors.shape
    rows = activation.double().reshape(-1, heads, width)
    router, vectors = router.double(), vectors.double()
    out = torch.empty_like(rows)
    for t in range(rows.shape[0]):
        for h in range(heads):
            logits = torch.stack([rows[t, h] @ router[e] for e in range(experts)])
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            merged = sum(p[e] * vectors[h, e] for e in range(experts))
            out[t, h] = rows[t, h] * merged
    return out.reshape(activation.shape)


@pytest.mark.parametrize("heads", [1, 3])
def test_mov_matches_per_token_reference(heads):
    site = trained_like(width=8, experts=5, heads=heads, seed=0)
    activation = torch.randn(2, 7, heads * 8, generator=torch.Generator().manual_seed(1))
    expected = reference_mov(activation, site.router.weight.detach(), site.vectors.detach())
    torch.testing.assert_close(site(activation).double(), expected, **CLOSE)


def test_mov_gradients_match_reference():
    site = trained_like(width=6, experts=4, heads=2, seed=2)
    activation = torch.randn(5, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    site(activation).pow(2).sum().backward()
    router = site.router.weight.detach().double().requires_grad_(True)
    vectors = site.vectors.detach().double().requires_grad_(True)
    reference_input = activation.detach().double().requires_grad_(True)
    reference_mov(reference_input, router, vectors).pow(2).sum().backward()
    torch.testing.assert_close(site.router.weight.grad.double(), router.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(site.vectors.grad.double(), vectors.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(activation.grad.double(), reference_input.grad, rtol=1e-4, atol=1e-5)


def test_mov_is_exactly_the_identity_at_init():
    site = MoVScaling(16, 10, heads=2)
    site.reset_parameters(torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        activation = torch.randn(4, 9, 32).to(dtype)
        assert torch.equal(site(activation), activation)


def test_mov_official_init():
    site = MoVScaling(256, 40, heads=2)
    site.reset_parameters(torch.Generator().manual_seed(0))
    assert torch.equal(site.vectors, torch.ones(2, 40, 256))
    assert abs(site.router.weight.std().item() - 0.02) < 0.001
    assert abs(site.router.weight.mean().item()) < 0.001


def test_mov_routes_in_float32_for_bfloat16_activations():
    site = trained_like(width=8, experts=4, heads=1, seed=4).to(torch.bfloat16)
    activation = torch.randn(6, 8).to(torch.bfloat16)
    merged, logits = site.merged_vectors(activation)
    assert logits.dtype == merged.dtype == torch.float32
    expected = reference_mov(activation, site.router.weight.detach(), site.vectors.detach())
    torch.testing.assert_close(site(activation).double(), expected, rtol=1e-2, atol=1e-2)  # bfloat16's 8 bits


def test_mov_on_grouped_query_attention_rescales_each_key_value_head():
    """Hooked on a real GQA attention (4 query heads, 2 key/value heads), the sites rescale each kv head's
    key and value by the reference's merged vector: the attention equals the one whose k_proj / v_proj
    outputs are replaced by the float64 reference."""
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         intermediate_size=64, attn_implementation="eager")
    torch.manual_seed(0)
    attention = LlamaAttention(config, layer_idx=0).eval()
    key_site = trained_like(width=8, experts=3, heads=2, seed=5)
    value_site = trained_like(width=8, experts=3, heads=2, seed=6)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    position_ids = torch.arange(5).expand(2, 5)
    rope = LlamaRotaryEmbedding(config)(hidden, position_ids)

    def run():
        with torch.no_grad():
            return attention(hidden, position_embeddings=rope, attention_mask=None)[0]

    handles = [attention.k_proj.register_forward_hook(key_site.linear_output_hook),
               attention.v_proj.register_forward_hook(value_site.linear_output_hook)]
    hooked = run()
    for handle in handles:
        handle.remove()
    plain = run()

    def reference_hook(site):
        return lambda module, args, output: reference_mov(
            output, site.router.weight.detach(), site.vectors.detach()).float()

    handles = [attention.k_proj.register_forward_hook(reference_hook(key_site)),
               attention.v_proj.register_forward_hook(reference_hook(value_site))]
    expected = run()
    for handle in handles:
        handle.remove()
    assert (hooked - plain).abs().max() > 1e-2  # the sites do act
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)


def test_mov_ffn_site_rescales_down_proj_input():
    site = trained_like(width=12, experts=4, heads=1, seed=8)
    down_proj = torch.nn.Linear(12, 6, bias=False)
    intermediate = torch.randn(3, 4, 12)
    handle = down_proj.register_forward_pre_hook(site.linear_input_hook)
    with torch.no_grad():
        hooked = down_proj(intermediate)
    handle.remove()
    expected = reference_mov(intermediate, site.router.weight.detach(), site.vectors.detach()).float()
    torch.testing.assert_close(hooked, down_proj(expected).detach(), **CLOSE)
