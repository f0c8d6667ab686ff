"""MoV on T5 against the official code's formulas (for-ai/parameter-efficient-moe, src/mov.py, src/routing.py, and
its flaxformer's MlpBlock), written here per token, per head and per expert in float64:

- keys and values (`MoVAttention` as `k_conv` / `v_conv` of every attention: encoder and decoder self-attention,
  cross-attention): for each token and head h, x = the projection's head-h slice, p = softmax over experts of
  float32(x) · float32(router[e]) (one router kernel per site, shared by its heads), y = x ⊙ Σ_e p_e l[h, e];
- the FFN (`MoV` as `intermediate_conv`, applied to the first factor only): a = act(wi_0·x) (act(wi·x) in T5 v1.0),
  p = softmax(float32(a) · float32(router)), a' = a ⊙ Σ_e p_e l[e], out = wo(a' ⊙ wi_1·x) (wo(a') in v1.0).

The reference replaces the dense T5's k / v outputs and its whole FFN by these formulas (hooks on the dense model),
with the converted model's perturbed routers and vectors, and runs a batch whose encoder input is padded; the
converted model must give the same logits.

Tolerance: the model routes in float32 (the official rule) and merges the vectors in float32, the rest in float64;
the reference routes in float32 as well and merges in float64. Each site's merged vector 1 + Σ_e p_e (l_e - 1)
differs by a few float32 roundings (u = 6e-8; E + 2 = 6 of them on |l_e - 1| < 2: below 1e-6 relative), and ~20
sites in 2 + 2 blocks carry that to the logits (|logit| < 4): measured 1e-6 at most. atol 1e-4 keeps a margin of
100 over that and stays far below what any wrong site does (each mutation tried moved the logits by > 1e-2).
"""

import pytest
import torch

from pesc.methods.mov import MOV
from pesc.testing.tiny_t5 import T5_VARIANTS
from helpers import load_t5_pair, perturb_added

EXPERTS = 4
INPUT_IDS = torch.tensor([[13, 27, 5, 40, 9, 1, 0, 0], [7, 88, 61, 2, 19, 33, 50, 1]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])  # padding in the encoder
DECODER_IDS = torch.tensor([[0, 41, 3, 77, 12], [0, 8, 8, 59, 30]])
CLOSE = dict(rtol=0.0, atol=1e-4)


def reference_mov(x: torch.Tensor, router: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """y[t, h] = x[t, h] ⊙ Σ_e p[t, h, e] l[h, e], p = softmax_e(float32(x[t, h]) · float32(router[e])); loops."""
    heads, experts, width = vectors.shape
    rows = x.reshape(-1, heads, width)
    out = torch.empty_like(rows, dtype=torch.float64)
    for t in range(rows.shape[0]):
        for h in range(heads):
            logits = torch.stack([rows[t, h].float() @ router[e].float() for e in range(experts)])
            p = torch.softmax(logits, dim=0, dtype=torch.float32).double()
            merged = sum(p[e] * vectors[h, e].double() for e in range(experts))
            out[t, h] = rows[t, h].double() * merged
    return out.reshape(x.shape).to(x.dtype)


def reference_ffn(ffn, site):
    """A forward hook that replaces the dense FFN's output by the official MlpBlock with MoV on its first factor."""
    def hook(module, args, output):
        x = args[0]
        first = ffn.act(ffn.wi_0(x) if hasattr(ffn, "wi_0") else ffn.wi(x))
        first = reference_mov(first, site.router.weight, site.vectors)
        return ffn.wo(first * ffn.wi_1(x) if hasattr(ffn, "wi_1") else first)
    return hook


def reference_hooks(dense, moe) -> list:
    """Hooks on the dense model that compute MoV's sites with `moe`'s tensors (its module names read only here)."""
    handles = []
    for stack in ("encoder", "decoder"):
        for dense_block, moe_block in zip(getattr(dense, stack).block, getattr(moe, stack).block):
            attentions = [("SelfAttention", 0)] + ([("EncDecAttention", 1)] if stack == "decoder" else [])
            for attention_name, index in attentions:
                dense_attention = getattr(dense_block.layer[index], attention_name)
                moe_attention = getattr(moe_block.layer[index], attention_name)
                for linear in ("k", "v"):
                    site = getattr(moe_attention, f"mov_{linear}")
                    handles.append(getattr(dense_attention, linear).register_forward_hook(
                        lambda module, args, output, site=site: reference_mov(output, site.router.weight,
                                                                              site.vectors)))
            ffn = dense_block.layer[-1].DenseReluDense
            handles.append(ffn.register_forward_hook(reference_ffn(ffn, moe_block.layer[-1].DenseReluDense.mov_act)))
    return handles


@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_mov_t5_matches_the_official_formulas(variant, tmp_path):
    dense, moe = load_t5_pair(tmp_path, variant, "mov", num_experts=EXPERTS)
    perturb_added(moe, MOV, scale=0.5)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            if name.endswith("router.weight"):
                param.mul_(10)  # peaked routing: a router reading another tensor or head shows
    batch = dict(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, decoder_input_ids=DECODER_IDS)
    with torch.no_grad():
        plain = dense(**batch).logits
        handles = reference_hooks(dense, moe)
        expected = dense(**batch).logits
        for handle in handles:
            handle.remove()
        got = moe(**batch).logits
    assert (expected - plain).abs().max() > 1e-1  # the sites act
    torch.testing.assert_close(got, expected, **CLOSE)
