"""MoLoRA on T5 against the official code's formulas (for-ai/parameter-efficient-moe, src/molora.py, src/routing.py,
configs/molora.gin), written here per token and per expert in float64: each site is a linear W0 of the dense T5
(q, k, v, o of every attention: encoder and decoder self-attention, cross-attention; wi_0 (wi in T5 v1.0) and wo in
the FFN), with its own router on the linear's input x:
    y = W0·x + (α/r) Σ_e p_e B_e A_e x,    p = softmax over experts of float32(x) · float32(router[e])
The reference adds that to the dense T5's linears (hooks), with the converted model's perturbed routers and experts,
on a batch whose encoder input is padded; the converted model must give the same logits.

Tolerance: the model computes its router logits in float32 in one matmul, the reference one expert at a time (the
official rule: float32 routing), so a logit may differ by float32 roundings (u = 6e-8 relative, on sums of 32 to 48
products) and its probability with it; the rest is float64 on both sides. ~30 sites in 2 + 2 blocks carry that to
the logits (|logit| < 4): measured 2.4e-6 at most. atol 1e-4 keeps a margin of 40 and stays far below what any wrong
site does (each mutation tried moved the logits by > 1e-2).
"""

import pytest
import torch

from pesc.methods.molora import MOLORA
from helpers import load_t5_pair, perturb_added

EXPERTS, RANK, ALPHA = 4, 2, 16.0
OFFICIAL_SITES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
INPUT_IDS = torch.tensor([[13, 27, 5, 40, 9, 1, 0, 0], [7, 88, 61, 2, 19, 33, 50, 1]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])  # padding in the encoder
DECODER_IDS = torch.tensor([[0, 41, 3, 77, 12], [0, 8, 8, 59, 30]])
CLOSE = dict(rtol=0.0, atol=1e-4)


def reference_experts(x: torch.Tensor, router: torch.Tensor, experts_a: torch.Tensor,
                      experts_b: torch.Tensor) -> torch.Tensor:
    """(α/r) Σ_e p_e B_e A_e x per token; A_e: rows e·r .. e·r + r - 1 of the stacked A, B_e: those columns of B."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.zeros(rows.shape[0], experts_b.shape[0], dtype=torch.float64)
    for t in range(rows.shape[0]):
        logits = torch.stack([rows[t].float() @ router[e].float() for e in range(EXPERTS)])
        p = torch.softmax(logits, dim=0, dtype=torch.float32).double()
        for e in range(EXPERTS):
            a, b = experts_a[e * RANK:(e + 1) * RANK].double(), experts_b[:, e * RANK:(e + 1) * RANK].double()
            out[t] += (ALPHA / RANK) * p[e] * (b @ (a @ rows[t].double()))
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def reference_hooks(dense, moe) -> tuple[list, set]:
    """Hooks adding the reference to each dense linear beside which `moe` has a site; and those linears' paths."""
    handles, paths = [], set()
    for name, site in moe.named_modules():
        parent, _, child = name.rpartition(".")
        if not child.startswith("molora_"):
            continue
        path = f"{parent}.{child.removeprefix('molora_')}"
        paths.add(path)
        handles.append(dense.get_submodule(path).register_forward_hook(
            lambda module, args, output, site=site: output + reference_experts(
                args[0], site.router.weight, site.experts_A, site.experts_B)))
    return handles, paths


def official_paths(attention_linears: list[str], ffn_linears: list[str]) -> set[str]:
    """The linears of the 2 + 2 blocks that get sites: each attention's (self; cross in the decoder) and the FFN's."""
    layers = {"encoder": ["SelfAttention", "DenseReluDense"],
              "decoder": ["SelfAttention", "EncDecAttention", "DenseReluDense"]}
    return {f"{stack}.block.{block}.layer.{index}.{module}.{linear}"
            for stack, modules in layers.items() for block in (0, 1) for index, module in enumerate(modules)
            for linear in (ffn_linears if module == "DenseReluDense" else attention_linears)}


@pytest.mark.parametrize("variant, sites, attention_linears, ffn_linears", [
    ("t5-v1.0", OFFICIAL_SITES, ["q", "k", "v", "o"], ["wi", "wo"]),
    ("t5-v1.1", OFFICIAL_SITES, ["q", "k", "v", "o"], ["wi_0", "wo"]),
    ("mt5", OFFICIAL_SITES, ["q", "k", "v", "o"], ["wi_0", "wo"]),
    ("t5-v1.1", ["v_proj", "up_proj"], ["v"], ["wi_1"]),  # other sites than the official ones are ours
])
def test_molora_t5_matches_the_official_formulas(variant, sites, attention_linears, ffn_linears, tmp_path):
    dense, moe = load_t5_pair(tmp_path, variant, "molora", num_experts=EXPERTS, expert_rank=RANK,
                              expert_alpha=ALPHA, sites=sites)
    perturb_added(moe, MOLORA, scale=0.1)
    with torch.no_grad():
        for name, param in moe.named_parameters():
            if name.endswith("router.weight"):
                param.mul_(5)  # peaked routing: a router reading another tensor shows
    batch = dict(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, decoder_input_ids=DECODER_IDS)
    with torch.no_grad():
        plain = dense(**batch).logits
        handles, hooked = reference_hooks(dense, moe)
        expected = dense(**batch).logits
        for handle in handles:
            handle.remove()
        got = moe(**batch).logits
    assert hooked == official_paths(attention_linears, ffn_linears)
    assert (expected - plain).abs().max() > 1e-1  # the sites act
    torch.testing.assert_close(got, expected, **CLOSE)
