"""torch.compile and static-cache generation, the way transformers users speed up decoding.

A compiled graph may not read router picks on the host nor a ContextVar, so the decode
step must be one graph; what it computes must be what eager computes, and the router
logits (for the balance loss) must still be recorded inside a compiled forward.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig

import pesc


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    """A tiny PESC model whose experts are non-zero (fresh `adapter_up` would add nothing)."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = pesc.upcycle(dense, num_experts=4, top_k=2, adapter_dim=16, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".moe_adapter." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def prompt(batch: int) -> torch.Tensor:
    return torch.randint(10, 200, (batch, 7), generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("batch", [1, 3])
def test_a_decode_step_is_one_graph(model, batch):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(input_ids=prompt(batch)[:, :1])
    assert explanation.graph_break_count == 0, [str(reason.reason)[:200] for reason in explanation.break_reasons]


def test_static_cache_generate_compiles_and_equals_eager(model):
    """transformers compiles the decode steps when the cache is static (on CUDA by itself; here forced)."""
    torch._dynamo.reset()
    ids = prompt(2)
    settings = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(**settings)
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers' switch for compiling on the CPU
    compiled = model.generate(**settings, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    assert torch.equal(compiled, eager)


def test_router_logits_and_balance_loss_are_recorded_inside_a_compiled_forward(model):
    torch._dynamo.reset()
    ids = prompt(2)
    eager = model(input_ids=ids, labels=ids, output_router_logits=True)
    compiled = torch.compile(model, backend="eager")(input_ids=ids, labels=ids, output_router_logits=True)
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids, output_router_logits=True)
    # (the routed training dispatch may break the graph at its expert loop, but never at the sink)
    assert not [reason for reason in explanation.break_reasons if "ContextVar" in str(reason.reason)]
    assert len(compiled.router_logits) == model.config.num_hidden_layers
    for got, want in zip(compiled.router_logits, eager.router_logits):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=0, atol=0)
    # the compiled call left no sink behind: an eager forward records its own logits again
    again = model(input_ids=ids, output_router_logits=True)
    assert len(again.router_logits) == model.config.num_hidden_layers
