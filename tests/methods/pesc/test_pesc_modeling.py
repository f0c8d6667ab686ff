"""The PESC model: exact at init, experts that matter and learn, generation, families."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

import pesc
from pesc.methods.pesc.modeling_pesc import PescForCausalLM
from pesc.testing import TINY_FAMILIES, build_tiny_dense
from pesc.training.model import enable_activation_checkpointing

SETTINGS = dict(num_experts=4, top_k=2, adapter_dim=16, seed=3)


def perturb_experts(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "moe_adapter" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_upcycled_model_equals_dense_at_init(family):
    dense = build_tiny_dense(family)
    model = pesc.upcycle(dense, **SETTINGS).eval()
    ids = torch.randint(0, dense.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = dense(ids).logits
        pesc_logits = model(ids).logits
    assert torch.equal(pesc_logits, dense_logits)  # bit-exact: each expert adds w_i * 0 to F(x)
    perturb_experts(model)
    with torch.no_grad():
        assert (model(ids).logits - dense_logits).abs().max().item() > 1e-3


def test_upcycle_shares_dense_tensors_and_places_camelidae_names():
    dense = build_tiny_dense("llama")
    model = pesc.upcycle(dense, **SETTINGS)
    assert model.model.layers[1].mlp.down_proj.weight is dense.model.layers[1].mlp.down_proj.weight
    assert model.model.embed_tokens.weight is dense.model.embed_tokens.weight
    names = set(model.state_dict())
    hidden, adapter_dim = dense.config.hidden_size, SETTINGS["adapter_dim"]
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["model.layers.0.mlp.moe_adapter.router.weight"] == (4, hidden)
    assert shapes["model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_down.weight"] == (adapter_dim, hidden)
    assert shapes["model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_up.weight"] == (hidden, adapter_dim)
    assert set(dense.state_dict()) <= names
    added = names - set(dense.state_dict())
    assert len(added) == 2 * (1 + 4 * 2)
    assert all(model.state_dict()[n].abs().sum() == 0 for n in added if n.endswith("adapter_up.weight"))


def test_upcycle_is_deterministic_for_a_seed():
    first = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).state_dict()
    again = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).state_dict()
    other = pesc.upcycle(build_tiny_dense("llama"), **{**SETTINGS, "seed": 4}).state_dict()
    router = "model.layers.0.mlp.moe_adapter.router.weight"
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first[router], other[router])


def test_gradients_reach_routers_and_adapters():
    model = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    out.loss.backward()
    for layer in model.model.layers:
        block = layer.mlp.moe_adapter
        assert block.router.weight.grad.abs().sum() > 0
        # adapter_up starts at zero, so only it gets a gradient from the LM loss at step 0 ...
        assert sum(e.adapter_up.weight.grad.abs().sum() for e in block.experts.values()) > 0


def test_gradient_checkpointing_keeps_the_balance_loss_gradient():
    model = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).train()
    enable_activation_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, output_router_logits=True)
    out.aux_loss.backward()
    assert all(layer.mlp.moe_adapter.router.weight.grad.abs().sum() > 0 for layer in model.model.layers)


def test_loss_includes_weighted_aux_loss():
    model = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_aux = model(ids, labels=ids)
        model.config.router_aux_loss_coef = 0.0
        without = model(ids, labels=ids, output_router_logits=True)
    assert with_aux.aux_loss is not None and with_aux.router_logits is None
    assert len(without.router_logits) == model.config.num_hidden_layers
    assert without.router_logits[0].shape == (2 * 16, 4)
    assert torch.allclose(with_aux.loss - without.loss, 0.01 * with_aux.aux_loss, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_generation_with_cache_equals_without(family):
    model = pesc.upcycle(build_tiny_dense(family), **SETTINGS).eval()
    perturb_experts(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without_cache = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 18)
    assert torch.equal(with_cache, without_cache)


def test_bfloat16_model_routes_in_float32():
    model = pesc.upcycle(build_tiny_dense("llama").to(torch.bfloat16), **SETTINGS).eval()
    assert model.model.layers[0].mlp.moe_adapter.router.weight.dtype == torch.bfloat16
    assert model.config.moe_dtype == "bfloat16"
    router = model.model.layers[0].mlp.moe_adapter.router
    weights, _ = router.route(router(torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16)))
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.ones(5))
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_families_without_a_gated_mlp_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="gpt2"):
        pesc.upcycle(gpt2, **SETTINGS)
    phi3 = Phi3ForCausalLM(
        Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match="phi3.*gate_proj"):
        pesc.upcycle(phi3, **SETTINGS)


def test_already_pesc_model_is_refused():
    model = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS)
    with pytest.raises(ValueError, match="already a PESC model"):
        pesc.upcycle(model, **SETTINGS)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        pesc.upcycle(build_tiny_dense("llama"), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="adapter_dim"):
        pesc.upcycle(build_tiny_dense("llama"), adapter_dim=0)


def test_model_built_from_config_starts_with_zero_adapter_up():
    config = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).config
    model = PescForCausalLM(config)
    for layer in model.model.layers:
        for expert in layer.mlp.moe_adapter.experts.values():
            assert expert.adapter_up.weight.abs().sum() == 0
            assert expert.adapter_down.weight.abs().max() <= 1 / config.hidden_size**0.5


def test_generation_cache_of_stacked_weights_follows_the_weights_and_is_dropped_for_training():
    model = pesc.upcycle(build_tiny_dense("llama"), **SETTINGS).eval()
    perturb_experts(model)
    block = model.model.layers[0].mlp.moe_adapter
    for layer in model.model.layers:  # the stacks serve the "all" decode dispatch (CUDA's pick)
        layer.mlp.moe_adapter._dispatch = "all"
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert block._stack_cache is not None
        # An in-place update (what an optimizer step does) must invalidate the cache.
        expert = next(iter(block.experts.values()))
        expert.adapter_up.weight.mul_(3.0)
        step = model(first[:, -1:]).logits
        fresh = model.model.layers[0].mlp.moe_adapter._stacked_adapter_weights()
        assert torch.equal(fresh[1][: expert.adapter_up.weight.shape[1]], expert.adapter_up.weight.t())
    assert step.shape[-1] == model.config.vocab_size
    model.train()
    model(ids, labels=ids).loss.backward()
    assert block._stack_cache is None


def test_model_deep_copies_and_pickles():
    """Trainers copy models (TRL's reference model, EMA, DeepSpeed's init): a copy computes the same logits."""
    import copy
    import io

    model = pesc.upcycle(build_tiny_dense("llama"), num_experts=4, top_k=2, adapter_dim=8, seed=0).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.moe_adapter.experts.expert_1.adapter_up.weight.normal_()
    ids = torch.tensor([[5, 17, 42, 99]])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
