"""MoV (arXiv 2309.05444): the layer against a per-token, per-head, per-expert float64 reference written here,
and the FFN site against the official MLP block (router on act(gate(x)), vectors on it, then * up(x)).

The layer routes in float32 (the paper's rule), so it cannot match a float64 reference
bit for bit: the tolerance (rtol 1e-5, atol 1e-6 on values of order 1) is a few float32 ulps
of accumulated rounding, far below the effect of any wrong routing or merge (order 1e-2).
The official MLP test derives its bound token by token (`official_mov_mlp`).
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding

from pesc.cli import main
from pesc.methods import register_auto_classes
from pesc.methods.mov import MOV
from pesc.methods.mov.modeling_mov import MoVScaling
from pesc.methods.mov.modeling_mov import mov_sites
from pesc.testing import TINY_FAMILIES
from helpers import LEGACY_CHECKPOINTS, read_tensors

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


def test_mov_ffn_site_rescales_down_proj_input():  # the 0.1.0 form, ffn_site "down_proj_input"
    site = trained_like(width=12, experts=4, heads=1, seed=8)
    down_proj = torch.nn.Linear(12, 6, bias=False)
    intermediate = torch.randn(3, 4, 12)
    handle = down_proj.register_forward_pre_hook(site.linear_input_hook)
    with torch.no_grad():
        hooked = down_proj(intermediate)
    handle.remove()
    expected = reference_mov(intermediate, site.router.weight.detach(), site.vectors.detach()).float()
    torch.testing.assert_close(hooked, down_proj(expected).detach(), **CLOSE)


# ---------------------------------------------------------------------------------------
# The method: convert, exactness at init, wiring into real families, counts, loading without pesc.
# ---------------------------------------------------------------------------------------
EXPERTS = 3


@pytest.fixture(scope="module")
def mov_checkpoints(tiny_dense_dirs, tmp_path_factory):
    """`pesc convert --method mov` of each tiny family (llama, mistral, qwen2: 4 heads, 2 key/value heads), and of
    llama in pesc 0.1.0's FFN form ("llama-down_proj_input")."""
    root = tmp_path_factory.mktemp("mov")
    runs = {family: (dense, []) for family, dense in tiny_dense_dirs.items()}
    runs["llama-down_proj_input"] = (tiny_dense_dirs["llama"], ["--ffn-site", "down_proj_input"])
    for name, (dense, extra) in runs.items():
        main(["convert", str(dense), str(root / name), "--method", "mov", "--num-experts", str(EXPERTS),
              "--seed", "1", *extra])
    return {name: root / name for name in runs}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_converted_mov_computes_exactly_the_dense_model(mov_checkpoints, tiny_dense_dirs, family, capsys):
    main(["compare", str(mov_checkpoints[family]), str(tiny_dense_dirs[family]), "--atol", "0"])
    assert "= 0" in capsys.readouterr().out


@pytest.mark.parametrize("ffn_site, checkpoint, ffn_name", [("activation", "llama", "act_fn"),
                                                            ("down_proj_input", "llama-down_proj_input", "down_proj")])
def test_convert_writes_the_mov_sites_with_the_seeded_draw(mov_checkpoints, tiny_llama_dir, ffn_site, checkpoint,
                                                           ffn_name):
    folder = mov_checkpoints[checkpoint]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "pesc_mov" and config["num_experts"] == EXPERTS
    assert config["ffn_site"] == ffn_site  # written explicitly, the default "activation" too
    kv_heads, head_dim, intermediate = config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]
    assert kv_heads < config["num_attention_heads"]  # grouped-query attention: the kv heads route
    tensors, dense = read_tensors(folder), read_tensors(tiny_llama_dir)
    for name, tensor in dense.items():
        assert torch.equal(tensors[name], tensor), name
    expected_shapes = {
        "self_attn.mov_k_proj.router.weight": [EXPERTS, head_dim],
        "self_attn.mov_k_proj.vectors": [kv_heads, EXPERTS, head_dim],
        "self_attn.mov_v_proj.router.weight": [EXPERTS, head_dim],
        "self_attn.mov_v_proj.vectors": [kv_heads, EXPERTS, head_dim],
        f"mlp.mov_{ffn_name}.router.weight": [EXPERTS, intermediate],  # either form: intermediate_size wide
        f"mlp.mov_{ffn_name}.vectors": [1, EXPERTS, intermediate],
    }
    layers = config["num_hidden_layers"]
    added = {name: list(t.shape) for name, t in tensors.items() if name not in dense}
    assert added == {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in expected_shapes.items()}
    routers = torch.cat([t.flatten() for n, t in tensors.items() if n in added and n.endswith("router.weight")])
    assert abs(routers.std().item() - 0.02) < 0.003  # the official N(0, 0.02)
    assert all(torch.equal(t, torch.ones_like(t)) for n, t in tensors.items() if n in added and n.endswith("vectors"))
    trained_config = MOV.config_class(**config)
    for i in range(layers):
        for key, value in MOV.initial_state(trained_config, i, 1).items():
            assert torch.equal(tensors[f"model.layers.{i}.{key}"], value), key
    first, second = (tensors[f"model.layers.{i}.self_attn.mov_k_proj.router.weight"] for i in (0, 1))
    assert not torch.equal(first, second)  # each layer its own draw


def perturbed_mov_model(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The converted model with trained-like sites: peaked routers, vectors away from ones."""
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mov_" in name:
                param.mul_(20) if name.endswith("router.weight") else param.add_(
                    torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("checkpoint", [*TINY_FAMILIES, "llama-down_proj_input"])
def test_mov_model_matches_the_dense_model_with_the_reference_sites(mov_checkpoints, tiny_dense_dirs, checkpoint):
    """The MoV model's logits equal the dense family's own model whose k_proj / v_proj outputs and act_fn outputs
    (down_proj inputs in the 0.1.0 form) are rescaled, layer by layer, by the float64 reference with the same
    tensors."""
    family = checkpoint.split("-")[0]
    model = perturbed_mov_model(mov_checkpoints[checkpoint])
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs[family], dtype=torch.float32).eval()

    def reference_site(site):
        weights = site.router.weight.detach(), site.vectors.detach()
        return lambda activation: reference_mov(activation, *weights).float()

    for layer, dense_layer in zip(model.model.layers, dense.model.layers):
        for name in ("k_proj", "v_proj"):
            rescale = reference_site(getattr(layer.self_attn, f"mov_{name}"))
            getattr(dense_layer.self_attn, name).register_forward_hook(lambda m, a, out, f=rescale: f(out))
        if model.config.ffn_site == "activation":
            rescale = reference_site(layer.mlp.mov_act_fn)
            dense_layer.mlp.act_fn.register_forward_hook(lambda m, a, out, f=rescale: f(out))
        else:
            rescale = reference_site(layer.mlp.mov_down_proj)
            dense_layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, f=rescale: (f(args[0]),))
    ids = torch.tensor([[5, 17, 33, 2, 71, 8, 40]])
    with torch.no_grad():
        logits, expected = model(input_ids=ids).logits, dense(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dense_dirs[family], dtype=torch.float32)(input_ids=ids).logits
    assert (logits - plain).abs().max() > 1e-2  # the sites act
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# float32's unit roundoff: the router and the merge run in float32 whatever the activations' dtype
UNIT_ROUNDOFF = 2.0**-24


def official_mov_mlp(mlp: torch.nn.Module, site, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official MoV MLP block (for-ai/parameter-efficient-moe: flaxformer's MlpBlock with MoV as its
    intermediate_conv), per token in float64, with the gated MLP's and the site's tensors:
        a = silu(W_gate x),  p = softmax(W_r a),  m = sum_e p_e l_e,  y = W_down((m * a) * (W_up x)),
    and the same block with the router reading a * (W_up x) instead (pesc 0.1.0's routing input).

    Also a bound on how far a float64 model whose router and merge run in float32 (the paper's rule, as the
    layer does) may be from y, to first order in float32's unit roundoff u (each float32 operation on a value v
    is off by at most u|v|, a dot product of n terms by n u sum |terms|):
    - logits: a and W_r rounded to float32, then a dot product of I terms: |dl_e| <= (I + 2) u sum_i |a_i W_r[e, i]|;
    - softmax (exp(l - max l), a sum of E terms, a division): |dp_e| <= p_e (2 max_e |dl_e| + 2 u max |l| + (E + 4) u);
    - merge 1 + p @ (L - 1) (L rounded to float32, the subtraction, E products, the sum, the add):
      |dm_i| <= sum_e |dp_e| |L_e,i - 1| + (E + 3) u sum_e p_e (|L_e,i - 1| + |L_e,i|) + u |m_i|;
    - the rest is float64: |dy| <= |W_down| (|dm| |a| |W_up x|), plus float64 rounding (below 1e-12 here).
    Doubled for the second-order terms."""
    gate, up, down = (mlp.gate_proj.weight.double(), mlp.up_proj.weight.double(), mlp.down_proj.weight.double())
    router, vectors = site.router.weight.double(), site.vectors.double()[0]
    experts, width = vectors.shape
    u = UNIT_ROUNDOFF
    official, product_routed, bound = [], [], []
    for token in x.double().reshape(-1, x.shape[-1]):
        g = gate @ token
        a = g / (1 + torch.exp(-g))  # silu, the tiny families' hidden_act
        b = up @ token

        def block(router_input):
            logits = torch.stack([router_input @ router[e] for e in range(experts)])
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            merged = sum(p[e] * vectors[e] for e in range(experts))
            return down @ ((merged * a) * b), logits, p, merged

        y, logits, p, merged = block(a)
        official.append(y)
        product_routed.append(block(a * b)[0])
        d_logits = (width + 2) * u * (a.abs() @ router.abs().T)
        d_p = p * (2 * d_logits.max() + 2 * u * logits.abs().max() + (experts + 4) * u)
        offsets = (vectors - 1).abs()
        d_merged = d_p @ offsets + (experts + 3) * u * (p @ (offsets + vectors.abs())) + u * merged.abs()
        bound.append(2 * (down.abs() @ (d_merged * a.abs() * b.abs())) + 1e-12)
    shape = (*x.shape[:-1], down.shape[0])
    return tuple(torch.stack(rows).reshape(shape) for rows in (official, product_routed, bound))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mov_mlp_is_the_official_block(mov_checkpoints, family):
    """ffn_site "activation" (what `pesc convert` writes): each layer's MLP, with trained-like (peaked, non-one)
    routers and vectors, run in float64 except for the float32 routing, is the official block within the
    derived bound; routing on act(gate(x)) * up(x) instead (pesc 0.1.0) lands far outside it."""
    model = perturbed_mov_model(mov_checkpoints[family], dtype=torch.float64)
    assert model.config.ffn_site == "activation" and model.config.hidden_act == "silu"
    x = torch.randn(2, 6, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    for layer in model.model.layers:
        with torch.no_grad():
            got = layer.mlp(x)
        official, product_routed, bound = official_mov_mlp(layer.mlp, layer.mlp.mov_act_fn, x)
        assert ((got - official).abs() <= bound).all(), ((got - official).abs() / bound).max()
        assert ((product_routed - official).abs() > 100 * bound).any()  # the routing input shows


def test_the_ffn_site_defaults_to_the_official_form_and_old_configs_keep_theirs():
    """A new conversion's default is "activation"; a config.json without the field (every 0.1.0 checkpoint: the
    fixture holds none) reads as "down_proj_input", whose sites are where 0.1.0 put them."""
    assert MOV.resolve_settings({})["ffn_site"] == "activation"
    fixture = json.loads((LEGACY_CHECKPOINTS / "mov" / "config.json").read_text())
    assert "ffn_site" not in fixture
    legacy = MOV.config_class(**fixture)
    assert legacy.ffn_site == "down_proj_input"
    assert mov_sites(legacy)[-1] == ("mlp", "down_proj", "input")
    assert json.loads(legacy.to_json_string())["ffn_site"] == "down_proj_input"  # saved again: the field is written


@pytest.mark.parametrize("checkpoint, whole", [("llama", "gate_proj"), ("llama-down_proj_input", "down_proj")])
def test_the_backbone_keeps_the_ffn_sites_linear_unmerged(mov_checkpoints, checkpoint, whole):
    """The backbone vLLM's Transformers backend loads (AutoModel) has the MLP linear the FFN site needs as an
    UnmergedLinear, which vLLM does not fuse: with gate_proj fused with up_proj into one act-and-mul, act_fn
    is replaced and the "activation" site is lost (vLLM 0.32 then fails compiling the re-hook)."""
    from pesc.modeling.moe_sites import UnmergedLinear

    backbone = MOV.auto_model_class(MOV.config_class.from_pretrained(mov_checkpoints[checkpoint]))
    for layer in backbone.layers:
        linears = ("gate_proj", "up_proj", "down_proj")
        assert [name for name in linears if type(getattr(layer.mlp, name)) is UnmergedLinear] == [whole]


def test_a_family_without_an_activation_module_is_a_one_line_error():
    from pesc.modeling.moe_sites import activation_on

    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    with pytest.raises(ValueError, match=r"^MoV cannot wrap model family 'toy': its decoder layers have no "
                                         r"activation module mlp.act_fn$"):
        activation_on(layer, "mlp", "act_fn", "toy", "MoV", [layer])
    layer.mlp.act_fn = torch.nn.SiLU()
    other = torch.nn.Module()
    other.mlp = torch.nn.Module()
    other.mlp.act_fn = layer.mlp.act_fn
    with pytest.raises(ValueError, match=r"share one mlp.act_fn module, which a site cannot hook per layer$"):
        activation_on(layer, "mlp", "act_fn", "toy", "MoV", [other, layer])
    assert activation_on(layer, "mlp", "act_fn", "toy", "MoV", [layer]) is layer.mlp.act_fn


def test_inspect_counts_equal_the_closed_form(mov_checkpoints, tiny_llama_dir, capsys):
    """Per layer: keys and values each a router [E, head_dim] + vectors [kv_heads, E, head_dim]; the FFN a
    router [E, I] + vectors [E, I]. Dense routing: every parameter is active."""
    config = json.loads((mov_checkpoints["llama"] / "config.json").read_text())
    dense_total = sum(t.numel() for t in read_tensors(tiny_llama_dir).values())

    def closed_form(experts):
        head_dim, kv_heads = config["head_dim"], config["num_key_value_heads"]
        per_layer = 2 * (experts * head_dim + kv_heads * experts * head_dim) + 2 * experts * config["intermediate_size"]
        return config["num_hidden_layers"] * per_layer

    main(["inspect", str(mov_checkpoints["llama"]), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "mov" and summary["settings"] == {"num_experts": EXPERTS, "ffn_site": "activation"}
    assert summary["trainable_params"] == closed_form(EXPERTS)
    assert summary["total_params"] == summary["active_params"] == dense_total + closed_form(EXPERTS)
    main(["inspect", str(tiny_llama_dir), "--method", "mov", "--num-experts", "30", "--json"])
    assert json.loads(capsys.readouterr().out)["trainable_params"] == closed_form(30)


def test_mov_emits_a_dense_routing_record_per_site(mov_checkpoints):
    """Per layer: k_proj and v_proj one record per key/value head (each head routes on its own), the FFN's
    act_fn one; one row per token; every expert is active (selected None)."""
    model = AutoModelForCausalLM.from_pretrained(mov_checkpoints["llama"], dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    with torch.no_grad():
        records = model(input_ids=ids, output_routing_records=True).routing_records
    kv_heads = model.config.num_key_value_heads
    sites = [f"{name}.head{h}" for name in ("k_proj", "v_proj") for h in range(kv_heads)] + ["act_fn"]
    expected = [(site, layer, 5) for layer in range(model.config.num_hidden_layers) for site in sites]
    assert [(r.site, r.layer, r.logits.shape[0]) for r in records] == expected
    assert all(r.logits.shape[1] == EXPERTS and r.logits.dtype == torch.float32 and r.selected is None
               for r in records)


def test_each_head_records_its_own_router_logits():
    """Record `site.head{h}` holds head h's logits: the router on that head's head_dim slice of every token."""
    from pesc.modeling.moe_routing import record_routing

    site = trained_like(width=8, experts=5, heads=3, seed=9)
    site.site = "k_proj"
    activation = torch.randn(2, 7, 3 * 8, generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), record_routing() as records:
        site(activation)
        _, logits = site.merged_vectors(activation)  # [tokens, heads, E], the same computation run again
    assert [r.site for r in records] == ["k_proj.head0", "k_proj.head1", "k_proj.head2"]
    for head, record in enumerate(records):
        assert torch.equal(record.logits, logits[:, head])
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # the heads route differently: a mix-up would show
