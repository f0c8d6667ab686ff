"""MoELoRA (#14): exact at init, the forward and both aux losses against float64 loops written here, a tiny run.

The references are per-token, per-expert loops of the formulas in docs/methods/moelora.md, in float64,
reading only the weights (never the dispatch or the loss helpers under test). The model runs in float32,
so every comparison allows float32 rounding (stated at each tolerance).
"""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pesc.cli import main
from pesc.methods.moelora import MOELORA
from pesc.methods.moelora import modeling_moelora
from pesc.methods.moelora.modeling_moelora import MoELoraForCausalLM, MoELoraSite, same_expert_infonce
from pesc.testing.isolated import checkpoint_outputs_without_pesc


def moelora_model(dense_dir, **settings):
    """(dense model, MoELoRA model) in float32: the dense weights plus the seeded initial experts."""
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    values = MOELORA.resolve_settings(settings)
    config = MOELORA.config_from_dense(dense.config, values)
    model = MoELoraForCausalLM(config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(MOELORA.is_added(name) for name in missing)
    for index, layer in enumerate(model.model.layers):
        layer.load_state_dict(MOELORA.initial_state(config, index, values["seed"]), strict=False)
    return dense, model.eval()


def sites(model):
    return [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1].startswith("moelora_")]


@torch.no_grad()
def perturb_experts(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _, site in sites(model):
        site.up.copy_(0.3 * torch.randn(site.up.shape, generator=generator))


IDS = torch.tensor([[5, 17, 33, 2, 71, 8], [9, 40, 3, 12, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # the second row ends in two padding tokens


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_exact_at_init_and_not_after(family, tiny_dense_dirs):
    dense, model = moelora_model(tiny_dense_dirs[family], sites="q_proj,k_proj,v_proj,o_proj", num_experts=4)
    assert len(sites(model)) == 4 * model.config.num_hidden_layers
    with torch.no_grad():
        expected = dense(input_ids=IDS, attention_mask=MASK).logits
        assert torch.equal(model(input_ids=IDS, attention_mask=MASK).logits, expected)
        perturb_experts(model)
        assert not torch.allclose(model(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-3)


def reference_site(x, weight, bias, site, keep=None, keep_scale=1.0):
    """W0 x (+ b) + sum over the two largest router logits of w_i (alpha/r) B_i A_i dropout(x), token by token,
    float64. dropout(x) = keep * x * keep_scale (keep: the 0/1 mask, None: no dropout); the router reads x."""
    x, weight, router = x.double(), weight.double(), site.router.weight.double()
    down, up = site.down.double(), site.up.double()
    rows = []
    tokens = x.reshape(-1, x.shape[-1])
    keeps = torch.ones_like(tokens) if keep is None else keep.reshape(tokens.shape).double()
    for token, kept in zip(tokens, keeps):
        y = weight @ token + (bias.double() if bias is not None else 0)
        logits = router @ token
        top = sorted(range(len(logits)), key=lambda e: -float(logits[e]))[: site.top_k]
        norm = sum(math.exp(float(logits[e])) for e in top)
        for e in top:
            y = y + math.exp(float(logits[e])) / norm * site.scaling * (up[e] @ (down[e] @ (token * kept * keep_scale)))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


FLOAT32_U = 2.0**-24  # float32 unit roundoff


@torch.no_grad()
def rounding_scales(x, weight, bias, site, grad, keep=None, keep_scale=1.0):
    """Where float32 rounding can move a site's results, and how far: (n, {name: M}) with M, for each entry of the
    output, x.grad, down.grad, up.grad and router.weight.grad, the sum of |terms| of its formula (every weight,
    input and upstream gradient `grad` by its absolute value), and n the most roundings on any entry's path.

    A float32 sum of products lies within n * u * sum |terms| of the exact value, also through nested matmuls
    (the n's of the chain add up); the mixed and the routed dispatch sum the same terms in other orders (all E*r
    columns at once, or each expert's r on its own tokens), so they agree within 2 n u M and each with the exact
    formula within n u M. The longest path: x's router gradient, A x' (in) -> B (E*r) -> against grad (out) ->
    the top-k softmax backward -> W_router^T (E), then over the tokens for the weights' gradients, plus the
    scalings, the top-k sum and the adds (8). The routing is the site's own (float32 logits, top-k, softmax)."""
    rows = x.reshape(-1, x.shape[-1])
    logits = site.router(rows)
    top_logits, selected = torch.topk(logits, site.top_k, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, selected, torch.softmax(top_logits, dim=-1)).double()  # [T, E]
    experts, rank, in_features = site.down.shape
    n = in_features + weight.shape[0] + experts * rank + experts + rows.shape[0] + 8
    keeps = torch.ones_like(rows) if keep is None else keep.reshape(rows.shape)
    x_abs, dropped = rows.double().abs(), keeps.double() * keep_scale * rows.double().abs()
    down, up, w0, w_router = (t.detach().double().abs() for t in (site.down, site.up, weight, site.router.weight))
    g = grad.reshape(-1, grad.shape[-1]).double().abs()
    scaled = gates * site.scaling
    hidden = torch.einsum("eri,ti->ter", down, dropped)  # |A_e| |x'_t|
    expert_out = torch.einsum("eor,ter->teo", up, hidden)  # |B_e| |A_e| |x'_t|
    back = torch.einsum("eor,to->ter", up, g)  # |B_e|^T |g_t|
    weight_grad = site.scaling * torch.einsum("to,teo->te", g, expert_out)  # |dL/dw_te|
    logit_grad = gates * (weight_grad + (gates * weight_grad).sum(-1, keepdim=True))  # w (dw - sum_k w_k dw_k)
    return n, {
        "out": (x_abs @ w0.T + (bias.double().abs() if bias is not None else 0)
                + torch.einsum("te,teo->to", scaled, expert_out)).reshape(*x.shape[:-1], -1),
        "x.grad": (g @ w0 + keeps.double() * keep_scale * torch.einsum("te,eri,ter->ti", scaled, down, back)
                   + logit_grad @ w_router).reshape(x.shape),
        "down.grad": torch.einsum("te,ter,ti->eri", scaled, back, dropped),
        "up.grad": torch.einsum("te,to,ter->eor", scaled, g, hidden),
        "router.grad": logit_grad.T @ x_abs,
    }


def assert_within(got, want, bound, what):
    difference = (got.double() - want.double()).abs()
    assert (difference <= bound).all(), f"{what}: off by {(difference / bound).max().item():.3g} times the bound"


def test_both_dispatches_apply_one_dropout_mask_per_token_as_the_formula(tiny_llama_dir, monkeypatch):
    """In training, dropout(x) is one mask over the site's input shared by a token's experts (drawn by
    moe_dropout.dropout_mask, fixed here), scaled by 1/(1-p); the router reads the undropped x. Both dispatches
    give the float64 formula, and the same gradients for every parameter and the input."""
    _, model = moelora_model(tiny_llama_dir, num_experts=4, lora_dropout=0.5)
    perturb_experts(model)
    site = model.model.layers[0].self_attn.moelora_q_proj
    linear = model.model.layers[0].self_attn.q_proj
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, linear.in_features, generator=generator)
    drop = torch.rand(14, linear.in_features, generator=generator) < 0.5
    drawn = []

    def fixed_mask(shape, p, device):
        assert tuple(shape) == tuple(drop.shape) and p == 0.5
        drawn.append(shape)
        return drop, 2.0

    monkeypatch.setattr(modeling_moelora, "dropout_mask", fixed_mask)
    site.train()
    results = {}
    for dispatch in ("mixed", "routed"):
        monkeypatch.setattr(site, "_dispatch", dispatch)
        xi = x.clone().requires_grad_(True)
        site.zero_grad(set_to_none=True)
        # the linear alone (calling it would run the site too: its hook is connected when the model is built)
        out = site.linear_output_hook(linear, (xi,), torch.nn.functional.linear(xi, linear.weight, linear.bias))
        out.backward(torch.ones_like(out))
        results[dispatch] = (out.detach(), xi.grad, site.down.grad, site.up.grad, site.router.weight.grad)
    assert len(drawn) == 2  # one mask per forward, not one per expert
    with torch.no_grad():
        expected = reference_site(x, linear.weight, linear.bias, site, keep=~drop, keep_scale=2.0)
        undropped = reference_site(x, linear.weight, linear.bias, site)
    assert (expected - undropped).abs().max() > 1e-2  # the mask matters well beyond the tolerance below
    n, scales = rounding_scales(x, linear.weight, linear.bias, site, torch.ones(14, linear.out_features),
                                keep=~drop, keep_scale=2.0)
    assert_within(results["mixed"][0], expected, n * FLOAT32_U * scales["out"], "mixed vs float64")
    for what, mixed, routed in zip(scales, results["mixed"], results["routed"]):
        assert mixed is not None and routed is not None
        assert_within(mixed, routed, 2 * n * FLOAT32_U * scales[what], f"{what}: mixed vs routed")


@pytest.mark.parametrize("dispatch", ["mixed", "routed"])
def test_forward_matches_a_float64_loop(tiny_llama_dir, dispatch, monkeypatch):
    monkeypatch.setattr(MoELoraSite, "_dispatch", dispatch)
    _, model = moelora_model(tiny_llama_dir, num_experts=4, lora_alpha=24, lora_dropout=0.0)
    perturb_experts(model)
    attention = model.model.layers[1].self_attn
    with torch.no_grad():
        model(input_ids=IDS)  # connects each site to its linear
    seen = {}

    def capture(name):
        def hook(module, args, output):  # registered after the site's hook: sees the output with the experts
            seen.setdefault(name, (args[0], output))
        return hook

    for name in ("q_proj", "v_proj"):
        getattr(attention, name).register_forward_hook(capture(name))
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    for name in ("q_proj", "v_proj"):
        x, out = seen[name]
        linear, site = getattr(attention, name), getattr(attention, "moelora_" + name)
        with torch.no_grad():
            expected = reference_site(x, linear.weight, linear.bias, site)
            delta = (expected - torch.nn.functional.linear(x, linear.weight, linear.bias).double()).abs().max()
        assert delta > 1e-2  # the experts contribute well beyond the tolerance below
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-5)  # float32 rounding of sums ~1e-6


@torch.no_grad()
def reference_balance(logits, mask, top_k):
    """E * sum_i f_i P_i over the non-padding tokens of one site, float64."""
    logits = logits.double()[mask]
    experts = logits.shape[-1]
    f, p = [0.0] * experts, [0.0] * experts
    for row in logits:
        probs = torch.softmax(row, -1)
        for e in sorted(range(experts), key=lambda e: -float(row[e]))[:top_k]:
            f[e] += 1 / (len(logits) * top_k)
        for e in range(experts):
            p[e] += float(probs[e]) / len(logits)
    return experts * sum(fi * pi for fi, pi in zip(f, p))


@torch.no_grad()
def reference_contrastive(outputs, experts, tau):
    """Mean over anchors with a positive of -1/|P| sum_p log(exp(s_np) / sum_{m != n} exp(s_nm)), float64 loops."""
    unit = [o.double() / o.double().norm() for o in outputs]
    losses = []
    for n in range(len(unit)):
        positives = [m for m in range(len(unit)) if m != n and experts[m] == experts[n]]
        if not positives:
            continue
        denominator = sum(math.exp(float(unit[n] @ unit[m]) / tau) for m in range(len(unit)) if m != n)
        losses.append(-sum(float(unit[n] @ unit[p]) / tau - math.log(denominator) for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else None


def test_balance_and_contrastive_losses_match_float64_loops_with_padding(tiny_llama_dir):
    _, model = moelora_model(tiny_llama_dir, num_experts=4, lora_dropout=0.0, contrastive_sample_size=7,
                             contrastive_temperature=0.2)
    perturb_experts(model, seed=3)
    inputs = {}
    for name, site in sites(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        linear = getattr(parent, site.site)
        linear.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
    model.train()
    torch.manual_seed(4)
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS, output_router_logits=True, output_routing_records=True)
    records = out.routing_records
    assert [r.site for r in records] == ["q_proj", "v_proj"] * model.config.num_hidden_layers
    mask = MASK.reshape(-1).bool()

    balance = [reference_balance(r.logits.detach(), mask, 2) for r in records]
    torch.testing.assert_close(out.aux_losses["aux_loss"].double(), torch.tensor(sum(balance) / len(balance),
                               dtype=torch.float64), rtol=1e-6, atol=0)  # float32 softmax sums
    unmasked = [reference_balance(r.logits.detach(), torch.ones_like(mask), 2) for r in records]
    assert abs(sum(unmasked) - sum(balance)) > 1e-4  # the padding would change it

    padded_sampled, site_losses = 0, []
    with torch.no_grad():  # the references read the weights, they do not train them
        for (name, site), record in zip(sites(model), records):
            x = inputs[name].reshape(-1, site.router.in_features).double()
            rows = record.extras["sample_rows"]
            assert len(set(rows.tolist())) == 7
            padded_sampled += int((~mask[rows]).sum())
            outputs, experts = [], []
            for row, produced in zip(rows.tolist(), record.extras["sample_outputs"]):
                logits = site.router.weight.double() @ x[row]
                top = sorted(range(4), key=lambda e: -float(logits[e]))[:2]
                assert record.selected[row].tolist() == top
                for j, e in enumerate(top):
                    expected = site.up[e].double() @ (site.down[e].double() @ x[row])
                    torch.testing.assert_close(produced[j].double(), expected, rtol=0, atol=1e-5)  # float32 matmuls
                    if mask[row]:
                        outputs.append(expected)
                        experts.append(e)
            site_losses.append(reference_contrastive(outputs, experts, 0.2))
    assert padded_sampled > 0  # some padding tokens were drawn, and had to be dropped
    kept = [loss for loss in site_losses if loss is not None]
    torch.testing.assert_close(out.aux_losses["contrastive_loss"].double(),
                               torch.tensor(sum(kept) / len(kept), dtype=torch.float64), rtol=1e-5, atol=0)
    # cosine / 0.2 reaches 5 and its exp ~150: float32 relative rounding, 1e-5 leaves room for the sums

    # both losses join the training loss with their default weights (0.01 each)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), IDS[:, 1:].reshape(-1))
    expected = lm + 0.01 * out.aux_losses["aux_loss"] + 0.01 * out.aux_losses["contrastive_loss"]
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)


def test_contrastive_loss_is_lower_for_separated_experts_than_for_identical_outputs():
    experts = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    generator = torch.Generator().manual_seed(0)
    identical = torch.randn(1, 16, generator=generator).repeat(9, 1)
    separated = torch.eye(16)[experts] * 3 + 0.05 * torch.randn(9, 16, generator=generator)
    same = same_expert_infonce(identical, experts, 0.07)
    apart = same_expert_infonce(separated, experts, 0.07)
    torch.testing.assert_close(same, torch.tensor(math.log(8)), rtol=1e-6, atol=0)  # every pair alike: log(N - 1)
    assert apart < same - 1.0
    assert same_expert_infonce(separated[[0, 3, 6]], experts[[0, 3, 6]], 0.07) is None  # no positive anywhere


# ---------------------------------------------------------------- a tiny run, resumed, exported


def _rows(n=32):
    return [{"messages": [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"},
                          {"role": "assistant", "content": f"{i % 7} + {i % 5} = {i % 7 + i % 5}."}]} for i in range(n)]


def _config(folder, base, data):
    config = {
        "base_model": str(base), "method": "moelora",
        "moe": {"num_experts": 4, "lora_rank": 4, "contrastive_sample_size": 16, "contrastive_loss_coef": 0.1,
                "seed": 1},
        "datasets": [{"path": str(data), "type": "messages"}], "chat_template": "chatml",
        "sequence_len": 48, "sample_packing": False, "micro_batch_size": 4, "max_steps": 6,
        "learning_rate": 0.02, "warmup_ratio": 0.0, "gradient_checkpointing": True, "bf16": False,
        "bnb_4bit_compute_dtype": "float32", "torch_dtype": "float32",
        "output_dir": str(folder / "run"), "logging_steps": 1, "save_steps": 3,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def moelora_runs(tiny_llama_dir, tmp_path_factory):
    """The same 6-step run twice (4-bit base, no LoRA: the method's default), uninterrupted, and crashed after
    checkpoint-3 then resumed. Padded batches (the masks matter) and gradient checkpointing (the recompute must
    draw the same contrastive sample)."""
    from transformers import TrainerCallback

    from pesc.training import train
    from pesc.training import trainer as trainer_module

    root = tmp_path_factory.mktemp("moelora-run")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (root / "full").mkdir()
    train(str(_config(root / "full", tiny_llama_dir, data)))

    class CrashAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash()

    original_init = trainer_module.MoETrainer.__init__

    def init_with_crash(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(CrashAfterFirstSave())

    (root / "part").mkdir()
    config = str(_config(root / "part", tiny_llama_dir, data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.MoETrainer, "__init__", init_with_crash)
        with pytest.raises(_Crash):
            train(config)
    train(config, resume=True)
    return root / "full" / "run", root / "part" / "run"


def test_tiny_run_trains_logs_both_losses_and_resumes_exactly(moelora_runs):
    full, part = moelora_runs
    logs = [entry for entry in json.loads((full / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert all("aux_loss" in entry and "contrastive_loss" in entry for entry in logs)
    assert any(entry["contrastive_loss"] > 0 for entry in logs)
    experts = load_file(full / "final" / "experts.safetensors")
    assert sorted({name.split(".", 3)[3].rsplit(".", 1)[0] for name in experts}) == [
        "self_attn.moelora_q_proj", "self_attn.moelora_q_proj.router",
        "self_attn.moelora_v_proj", "self_attn.moelora_v_proj.router"]
    assert all(t.abs().sum() > 0 for n, t in experts.items() if n.endswith(".up"))  # B moved away from zero
    assert not (full / "final" / "adapter_model.safetensors").exists()  # no LoRA: routers and experts alone train
    resumed = load_file(part / "final" / "experts.safetensors")
    assert resumed.keys() == experts.keys()
    for name in experts:
        torch.testing.assert_close(resumed[name], experts[name], rtol=0, atol=0, msg=name)


def test_export_loads_without_pesc_and_computes_the_trained_model(moelora_runs, tmp_path):
    from pesc.checkpoint.trained_run import load_trained_model

    full, _ = moelora_runs
    out = tmp_path / "export"
    main(["export", str(full), str(out), "--dtype", "float32"])
    for name in (path.name for path in MOELORA.shipped_files):
        assert (out / name).is_file()
    ids = [[5, 17, 33, 2, 71, 8]]
    fresh = checkpoint_outputs_without_pesc(out, ids)
    assert fresh["class"] == "MoELoraForCausalLM"
    model, _, _ = load_trained_model(full, dtype=torch.float32)  # no LoRA: the model itself
    with torch.no_grad():
        trained = model(input_ids=torch.tensor(ids)).logits
        assert torch.equal(torch.tensor(fresh["logits"]), trained)  # same weights, same float32 ops
        for _, site in sites(model):
            site.up.zero_()
        assert (model(input_ids=torch.tensor(ids)).logits - trained).abs().max() > 1e-4  # the experts matter
