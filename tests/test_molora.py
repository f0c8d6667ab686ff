"""MoLoRA (arXiv 2309.05444): the layer against a per-token, per-expert float64 reference written here.

The router runs in float32 (the paper's rule), so the layer cannot match a float64
reference bit for bit: rtol 1e-5 / atol 1e-6 on outputs of order 1 is a few float32 ulps of
accumulated rounding, far below the effect of a wrong expert, weight or scaling.
"""

import pytest
import torch

from pesc.modeling.modeling_molora import MoLoRAExperts

CLOSE = dict(rtol=1e-5, atol=1e-6)
IN, OUT, EXPERTS, RANK, ALPHA = 12, 10, 5, 3, 16.0


def trained_like(seed: int, **routing) -> MoLoRAExperts:
    """A MoLoRA site with the official init, then B moved off zero (as training leaves it)."""
    site = MoLoRAExperts(IN, OUT, EXPERTS, RANK, ALPHA, **routing)
    generator = torch.Generator().manual_seed(seed)
    site.reset_parameters(generator)
    with torch.no_grad():
        site.router.weight.mul_(30)  # peaked routing, so that top-k and renormalising matter
        site.experts_B.weight.normal_(0.0, 0.2, generator=generator)
    return site


def reference_molora(x, router, experts_A, experts_B, top_k=0, renormalize=False):
    """y[t] = (alpha/r) sum_e p[t, e] B_e A_e x[t], each expert on its own, float64.

    p = softmax over all experts; with top_k, the k largest kept (the official mask), divided by their
    sum when renormalising. A_e: rows e*r..e*r+r-1 of experts_A; B_e: the same columns of experts_B.
    """
    rows = x.double().reshape(-1, x.shape[-1])
    router, experts_A, experts_B = router.double(), experts_A.double(), experts_B.double()
    out = torch.zeros(rows.shape[0], experts_B.shape[0], dtype=torch.float64)
    for t in range(rows.shape[0]):
        logits = torch.stack([rows[t] @ router[e] for e in range(EXPERTS)])
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        if top_k:
            kept = sorted(range(EXPERTS), key=lambda e: -p[e].item())[:top_k]
            p = torch.stack([p[e] if e in kept else p[e] * 0 for e in range(EXPERTS)])
            if renormalize:
                p = p / p.sum()
        for e in range(EXPERTS):
            a_e = experts_A[e * RANK : (e + 1) * RANK]
            b_e = experts_B[:, e * RANK : (e + 1) * RANK]
            out[t] += p[e] * (ALPHA / RANK) * (b_e @ (a_e @ rows[t]))
    return out.reshape(*x.shape[:-1], -1)


def reference_of(site, x):
    return reference_molora(x, site.router.weight.detach(), site.experts_A.weight.detach(), site.experts_B.weight.detach(),
                            site.router.top_k, site.router.renormalize)


@pytest.mark.parametrize("routing", [{}, {"top_k": 2}, {"top_k": 2, "renormalize": True}],
                         ids=["dense", "top2-masked", "top2-renormalised"])
def test_molora_matches_per_token_reference(routing):
    site = trained_like(0, **routing)
    x = torch.randn(3, 6, IN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(site(x).double(), reference_of(site, x), **CLOSE)


def test_top_k_modes_differ_from_dense_and_from_each_other():
    """The masked and renormalised modes are not the dense mixture in disguise (guards the reference test)."""
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(1))
    outputs = [trained_like(0, **routing)(x) for routing in ({}, {"top_k": 2}, {"top_k": 2, "renormalize": True})]
    for i in range(3):
        for j in range(i):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-3


def test_molora_gradients_match_reference():
    site = trained_like(2)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(3), requires_grad=True)
    site(x).pow(2).sum().backward()
    leaves = [site.router.weight, site.experts_A.weight, site.experts_B.weight]
    reference_leaves = [p.detach().double().requires_grad_(True) for p in leaves]
    reference_x = x.detach().double().requires_grad_(True)
    reference_molora(reference_x, *reference_leaves).pow(2).sum().backward()
    for leaf, reference in zip(leaves + [x], reference_leaves + [reference_x]):
        torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-4, atol=1e-5)


def test_molora_hook_adds_the_mixture_to_the_linear_output():
    site = trained_like(4)
    linear = torch.nn.Linear(IN, OUT)
    x = torch.randn(2, 5, IN)
    handle = linear.register_forward_hook(site.linear_output_hook)
    with torch.no_grad():
        hooked = linear(x)
    handle.remove()
    with torch.no_grad():
        expected = linear(x).double() + reference_of(site, x)
    torch.testing.assert_close(hooked.double(), expected, **CLOSE)


def test_molora_is_exactly_the_identity_at_init():
    site = MoLoRAExperts(IN, OUT, EXPERTS, RANK, ALPHA, top_k=2)
    site.reset_parameters(torch.Generator().manual_seed(0))
    linear = torch.nn.Linear(IN, OUT)
    x = torch.randn(4, 6, IN)
    with torch.no_grad():
        plain = linear(x)
        linear.register_forward_hook(site.linear_output_hook)
        assert torch.equal(linear(x), plain)


def test_molora_official_init():
    site = MoLoRAExperts(512, 64, 10, 4, 16.0)
    site.reset_parameters(torch.Generator().manual_seed(0))
    assert torch.equal(site.experts_B.weight, torch.zeros(64, 40))
    for weight in (site.experts_A.weight, site.router.weight):
        assert abs(weight.std().item() - 0.02) < 0.001 and abs(weight.mean().item()) < 0.001
    assert site.scaling == 4.0


def test_jitter_scales_the_router_input_while_training_only():
    """Jitter multiplies the router's input by U(1-j, 1+j) noise from torch's RNG in train mode, never in eval."""
    site = trained_like(5, jitter=0.3)
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(6))
    clean = reference_of(site, x)
    torch.testing.assert_close(site.eval()(x).double(), clean, **CLOSE)
    site.train()
    torch.manual_seed(7)
    noisy = site(x)
    torch.manual_seed(7)
    noise = torch.empty(x.shape).uniform_(0.7, 1.3)
    router = site.router.weight.detach().double()
    jittered_router_input = (x.double() * noise.double())
    logits = jittered_router_input @ router.t()
    p = torch.softmax(logits, dim=-1)
    experts_A, experts_B = site.experts_A.weight.detach().double(), site.experts_B.weight.detach().double()
    hidden = (x.double() @ experts_A.t()).view(6, EXPERTS, RANK) * p.unsqueeze(-1)
    expected = hidden.flatten(1) @ experts_B.t() * (ALPHA / RANK)
    assert (noisy.double() - clean).abs().max() > 1e-3
    torch.testing.assert_close(noisy.double(), expected, **CLOSE)


def test_molora_routes_in_float32_for_bfloat16_inputs():
    site = trained_like(8).to(torch.bfloat16)
    x = torch.randn(5, IN).to(torch.bfloat16)
    out, logits, selected = site.mixture(x)
    assert logits.dtype == torch.float32 and selected is None and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference_of(site, x), rtol=2e-2, atol=2e-2)  # bfloat16's 8 bits
