"""MoLoRA (arXiv 2309.05444): the layer against a per-token, per-expert float64 reference written here.

The router runs in float32 (the paper's rule), so the layer cannot match a float64
reference bit for bit: rtol 1e-5 / atol 1e-6 on outputs of order 1 is a few float32 ulps of
accumulated rounding, far below the effect of a wrong expert, weight or scaling.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pesc.cli import main
from pesc.methods import register_auto_classes
from pesc.methods.molora import MOLORA
from pesc.methods.molora.modeling_molora import MoLoRAExperts
from pesc.testing import TINY_FAMILIES
from helpers import LEGACY_CHECKPOINTS, read_tensors

CLOSE = dict(rtol=1e-5, atol=1e-6)
IN, OUT, EXPERTS, RANK, ALPHA = 12, 10, 5, 3, 16.0


def trained_like(seed: int, **routing) -> MoLoRAExperts:
    """A MoLoRA site with the official init, then B moved off zero (as training leaves it)."""
    site = MoLoRAExperts(IN, OUT, EXPERTS, RANK, ALPHA, **routing)
    generator = torch.Generator().manual_seed(seed)
    site.reset_parameters(generator)
    with torch.no_grad():
        site.router.weight.mul_(30)  # peaked routing, so that top-k and renormalising matter
        site.experts_B.normal_(0.0, 0.2, generator=generator)
    return site


def reference_molora(x, router, experts_A, experts_B, top_k=0, renormalize=False, experts=EXPERTS, rank=RANK,
                     alpha=ALPHA):
    """y[t] = (alpha/r) sum_e p[t, e] B_e A_e x[t], each expert on its own, float64.

    p = softmax over all experts; with top_k, the k largest kept (the official mask), divided by their
    sum when renormalising. A_e: rows e*r..e*r+r-1 of experts_A; B_e: the same columns of experts_B.
    """
    rows = x.double().reshape(-1, x.shape[-1])
    router, experts_A, experts_B = router.double(), experts_A.double(), experts_B.double()
    out = torch.zeros(rows.shape[0], experts_B.shape[0], dtype=torch.float64)
    for t in range(rows.shape[0]):
        logits = torch.stack([rows[t] @ router[e] for e in range(experts)])
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        if top_k:
            kept = sorted(range(experts), key=lambda e: -p[e].item())[:top_k]
            p = torch.stack([p[e] if e in kept else p[e] * 0 for e in range(experts)])
            if renormalize:
                p = p / p.sum()
        for e in range(experts):
            a_e = experts_A[e * rank : (e + 1) * rank]
            b_e = experts_B[:, e * rank : (e + 1) * rank]
            out[t] += p[e] * (alpha / rank) * (b_e @ (a_e @ rows[t]))
    return out.reshape(*x.shape[:-1], -1)


def reference_of(site, x):
    return reference_molora(x, site.router.weight.detach(), site.experts_A.detach(), site.experts_B.detach(),
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
    leaves = [site.router.weight, site.experts_A, site.experts_B]
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
    assert torch.equal(site.experts_B, torch.zeros(64, 40))
    for weight in (site.experts_A, site.router.weight):
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
    experts_A, experts_B = site.experts_A.detach().double(), site.experts_B.detach().double()
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


# ---------------------------------------------------------------------------------------
# The method: convert, exactness at init, wiring into real families, counts, loading without pesc.
# ---------------------------------------------------------------------------------------
# The default sites: the official ones (T5's q, k, v, o, wi_0 and wo), not up_proj (T5's wi_1)
SITES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "down_proj": "mlp"}
# pesc 0.1.0's default, every projection: still a valid choice (up_proj is a site of ours)
SEVEN_SITES = {**SITES, "up_proj": "mlp"}


@pytest.fixture(scope="module")
def molora_checkpoints(tiny_dense_dirs, tmp_path_factory):
    """`pesc convert --method molora` (3 experts of rank 2, alpha 8, top-2 renormalised) of each tiny family with
    the default sites, and of llama on all seven projections ("llama-seven")."""
    root = tmp_path_factory.mktemp("molora")
    runs = {family: (dense, []) for family, dense in tiny_dense_dirs.items()}
    runs["llama-seven"] = (tiny_dense_dirs["llama"], ["--sites", ",".join(SEVEN_SITES)])
    for name, (dense, extra) in runs.items():
        main(["convert", str(dense), str(root / name), "--method", "molora", "--num-experts", "3",
              "--expert-rank", "2", "--expert-alpha", "8", "--top-k", "2", "--top-k-weights", "renormalized",
              "--seed", "1", *extra])
    return {name: root / name for name in runs}


def test_the_default_sites_are_the_official_ones_and_old_checkpoints_keep_theirs():
    """New conversions: q, k, v, o, gate, down (the official code's sites, no up_proj). A 0.1.0 config.json names
    its sites (`molora_sites`, then all seven), so it keeps them; tests/checkpoint/test_legacy_checkpoints.py checks
    that it computes the logits it did."""
    assert MOLORA.resolve_settings({})["sites"] == list(SITES)
    fixture = json.loads((LEGACY_CHECKPOINTS / "molora" / "config.json").read_text())
    assert sorted(fixture["molora_sites"]) == sorted(SEVEN_SITES)  # up_proj among them
    assert MOLORA.config_class(**fixture).sites == fixture["molora_sites"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_converted_molora_computes_exactly_the_dense_model(molora_checkpoints, tiny_dense_dirs, family, capsys):
    main(["compare", str(molora_checkpoints[family]), str(tiny_dense_dirs[family]), "--atol", "0"])
    assert "= 0" in capsys.readouterr().out


@pytest.mark.parametrize("checkpoint, sites", [("llama", SITES), ("llama-seven", SEVEN_SITES)])
def test_convert_writes_the_molora_sites_with_the_seeded_draw(molora_checkpoints, tiny_llama_dir, checkpoint, sites):
    folder = molora_checkpoints[checkpoint]
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["expert_rank"], config["expert_alpha"],
            config["num_experts_per_tok"], config["router_topk_weights"]) == (
        "pesc_molora", 3, 2, 8, 2, "renormalized")
    assert config["sites"] == list(sites)
    tensors, dense = read_tensors(folder), read_tensors(tiny_llama_dir)
    for name, tensor in dense.items():
        assert torch.equal(tensors[name], tensor), name
    layers = config["num_hidden_layers"]
    expected = {}
    for i in range(layers):
        for linear, parent in sites.items():
            out_features, in_features = dense[f"model.layers.{i}.{parent}.{linear}.weight"].shape
            prefix = f"model.layers.{i}.{parent}.molora_{linear}"
            expected |= {f"{prefix}.router.weight": [3, in_features], f"{prefix}.experts_A": [3 * 2, in_features],
                         f"{prefix}.experts_B": [out_features, 3 * 2]}
    assert {name: list(t.shape) for name, t in tensors.items() if name not in dense} == expected
    for name in expected:
        if name.endswith("experts_B"):
            assert not tensors[name].any()  # B = 0: the identity at init
    drawn = torch.cat([tensors[n].flatten() for n in expected if not n.endswith("experts_B")])
    assert abs(drawn.std().item() - 0.02) < 0.002  # A and the routers ~ N(0, 0.02)
    trained_config = MOLORA.config_class(**config)
    for i in range(layers):
        for key, value in MOLORA.initial_state(trained_config, i, 1).items():
            assert torch.equal(tensors[f"model.layers.{i}.{key}"], value), key


def perturbed_molora_model(folder: Path, seed: int = 0):
    """The converted model with trained-like sites: peaked routers, non-zero B."""
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight") and ".molora_" in name:
                param.mul_(30)
            elif name.endswith("experts_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("checkpoint", [*TINY_FAMILIES, "llama-seven"])
def test_molora_model_matches_the_dense_model_with_the_reference_sites(molora_checkpoints, tiny_dense_dirs, checkpoint):
    """The MoLoRA model's logits (top-2, renormalised) equal the dense family's own model whose sited
    projections each add the float64 per-token, per-expert reference mixture with the same tensors."""
    family = checkpoint.split("-")[0]
    model = perturbed_molora_model(molora_checkpoints[checkpoint])
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs[family], dtype=torch.float32).eval()
    for layer, dense_layer in zip(model.model.layers, dense.model.layers):
        for linear in model.config.sites:
            parent = SEVEN_SITES[linear]
            site = getattr(getattr(layer, parent), f"molora_{linear}")
            tensors = site.router.weight.detach(), site.experts_A.detach(), site.experts_B.detach()

            def add_reference(module, args, out, tensors=tensors):
                return out + reference_molora(args[0], *tensors, top_k=2, renormalize=True, experts=3, rank=2,
                                              alpha=8.0).float()

            getattr(getattr(dense_layer, parent), linear).register_forward_hook(add_reference)
    ids = torch.tensor([[5, 17, 33, 2, 71, 8, 40]])
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, dense(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs[family], dtype=torch.float32)(input_ids=ids).logits
    assert (logits - plain).abs().max() > 1e-2  # the experts act
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def closed_form(config: dict, experts: int, rank: int, sites, top_k: int = 0) -> tuple[int, int]:
    """(added parameters, of which inactive per token): per site a router [E, in], A [E*r, in], B [out, E*r];
    with top-k the E-k unkept experts' A and B are inactive."""
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim, intermediate = config["head_dim"], config["intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
              "down_proj": (intermediate, hidden)}
    added = sum(experts * i + experts * rank * (i + o) for i, o in (shapes[s] for s in sites))
    inactive = sum((experts - top_k) * rank * (i + o) for i, o in (shapes[s] for s in sites)) if top_k else 0
    return config["num_hidden_layers"] * added, config["num_hidden_layers"] * inactive


def test_inspect_counts_equal_the_closed_form(molora_checkpoints, tiny_llama_dir, capsys):
    config = json.loads((molora_checkpoints["llama"] / "config.json").read_text())
    dense_total = sum(t.numel() for t in read_tensors(tiny_llama_dir).values())
    main(["inspect", str(molora_checkpoints["llama"]), "--json"])
    summary = json.loads(capsys.readouterr().out)
    added, inactive = closed_form(config, 3, 2, SITES, top_k=2)
    assert summary["method"] == "molora" and summary["settings"]["top_k"] == 2
    assert summary["trainable_params"] == added and summary["total_params"] == dense_total + added
    assert summary["active_params"] == dense_total + added - inactive
    main(["inspect", str(tiny_llama_dir), "--method", "molora", "--sites", "q_proj,v_proj,down_proj", "--json"])
    summary = json.loads(capsys.readouterr().out)
    added, _ = closed_form(config, 10, 4, ["q_proj", "v_proj", "down_proj"])
    assert summary["trainable_params"] == added
    assert summary["total_params"] == summary["active_params"] == dense_total + added  # dense: all active


def test_bad_sites_are_one_line_errors(tiny_llama_dir, tmp_path, capsys):
    for sites in ("q_proj,x_proj", "q_proj,q_proj"):
        with pytest.raises(SystemExit):
            main(["convert", str(tiny_llama_dir), str(tmp_path / "x"), "--method", "molora", "--sites", sites])
        err = capsys.readouterr().err.strip()
        assert err.startswith("Error: sites must be a non-empty list of distinct linears among q_proj")
        assert "\n" not in err
    assert not (tmp_path / "x").exists()


def test_molora_emits_a_routing_record_per_site_with_its_top_k(molora_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(molora_checkpoints["llama"], dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    with torch.no_grad():
        records = model(input_ids=ids, output_routing_records=True).routing_records
    assert [(r.site, r.layer) for r in records] == [
        (site, layer) for layer in range(model.config.num_hidden_layers) for site in SITES]
    for record in records:
        assert record.logits.shape == (5, 3) and record.logits.dtype == torch.float32
        assert torch.equal(record.selected, record.logits.topk(2, dim=-1).indices)  # the top-2 kept

