"""`pesc train` on the real QLoRA path (bitsandbytes 4-bit NF4 on the CPU + peft), with a tiny llama."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pesc.errors import PescError
from pesc.training.config import load_config, validate
from helpers import make_config, read_tensors, run_with_crash_at, training_rows


# ---------------------------------------------------------------- config validation


def test_config_defaults_and_overrides(tmp_path, tiny_llama_dir, data_file):
    path = make_config(tmp_path, tiny_llama_dir, data_file)
    config = load_config(path, ["moe.top_k=1", "learning_rate=3e-4", "sample_packing=false", "report_to=[tensorboard]"])
    assert config["moe"]["top_k"] == 1 and config["learning_rate"] == 3e-4
    assert config["sample_packing"] is False and config["report_to"] == ["tensorboard"]
    assert config["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config["load_in_4bit"] is True and config["optimizer"] == "adamw_torch"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lora_rr": 8}, "unknown config key 'lora_rr' (did you mean 'lora_r'?)"),
        ({"lora_r": "eight"}, "lora_r must be an integer"),
        ({"load_in_4bit": "yes"}, "load_in_4bit must be true/false"),
        ({"learning_rate": True}, "learning_rate must be a number"),
        ({"moe": {"num_expert": 8}}, "unknown config key 'moe.num_expert'"),
        ({"moe": {"top_k": 1.5}}, "moe.top_k must be an integer"),
        ({"datasets": [{"path": "x.jsonl", "typ": "messages"}]}, "unknown config key 'datasets[0].typ'"),
        ({"datasets": [{"path": "x.jsonl", "type": "chatml"}]}, "datasets[0].type must be one of"),
        ({"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type must be one of nf4, fp4"),
        ({"output_dir": None}, "the config needs 'output_dir'"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    base = {"base_model": "m", "datasets": [{"path": "x.jsonl", "type": "messages"}], "output_dir": "o"}
    with pytest.raises(PescError) as error:
        validate({**base, **raw})
    assert message in str(error.value)


def test_cli_bad_key_is_one_line_error(tmp_path, tiny_llama_dir, data_file, capsys):
    from pesc.cli import main

    path = make_config(tmp_path, tiny_llama_dir, data_file, micro_batch_sise=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    assert exit_info.value.code == 1
    assert "unknown config key 'micro_batch_sise' (did you mean 'micro_batch_size'?)" in capsys.readouterr().err


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load when the input is bad")

    monkeypatch.setattr("pesc.training.model.load_base_model", refuse)


def test_missing_data_file_fails_before_model_loads(tmp_path, tiny_llama_dir, monkeypatch):
    from pesc.training import train

    _no_model_load(monkeypatch)
    path = make_config(tmp_path, tiny_llama_dir, tmp_path / "nowhere.jsonl")
    with pytest.raises(PescError, match="nowhere.jsonl"):
        train(str(path))
    assert not (tmp_path / "run").exists()


def test_malformed_row_fails_before_model_loads(tmp_path, tiny_llama_dir, monkeypatch):
    from pesc.training import train

    _no_model_load(monkeypatch)
    bad = tmp_path / "bad.jsonl"
    rows = training_rows(4)
    rows[2] = {"messages": [{"role": "user", "text": "no content key"}]}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = make_config(tmp_path, tiny_llama_dir, bad)
    with pytest.raises(PescError, match=r"bad\.jsonl: row 3: .*missing key 'content'"):
        train(str(path))


def test_dense_base_without_moe_is_refused(tmp_path, tiny_llama_dir, data_file, monkeypatch):
    from pesc.training import train

    _no_model_load(monkeypatch)
    path = make_config(tmp_path, tiny_llama_dir, data_file, moe=None)
    with pytest.raises(PescError, match="add a moe: section"):
        train(str(path))


def test_train_refuses_a_folder_of_other_files_and_takes_an_empty_one_or_a_run(tmp_path, tiny_llama_dir, data_file,
                                                                              monkeypatch, capsys):
    """A run writes checkpoints and logs among whatever output_dir holds: a folder of the user's files is refused
    (one line, before the model loads, nothing written), with or without --resume; an empty folder and a pesc run
    folder are taken."""
    from pesc.cli import main
    from pesc.training.run import check_run_folder

    _no_model_load(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    path = make_config(tmp_path, tiny_llama_dir, data_file)
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(path), *extra])
        assert exit_info.value.code == 1
        error = capsys.readouterr().err.strip()
        assert error == f"Error: output_dir {out} holds files and is not a pesc training run: give a new or empty " \
                        "folder"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    check_run_folder(tmp_path / "new")
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_folder(empty)
    (out / "pesc_train_config.yaml").write_text("output_dir: run\n")  # a run killed before its first save
    check_run_folder(out)
    (out / "pesc_train_config.yaml").unlink()
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "experts.safetensors").write_bytes(b"")  # a run's checkpoint: the folder is pesc's
    check_run_folder(out)


def test_drop_records_after_keeps_the_steps_up_to_the_resumed_one(tmp_path):
    from pesc.training.trainer import drop_records_after

    path = tmp_path / "expert_load.jsonl"
    lines = [json.dumps({"step": step, "expert_load": [[0.5, 0.5]]}) + "\n" for step in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"step": 5, "expert_lo')  # killed while writing step 5
    drop_records_after(path, 4)
    assert path.read_text() == "".join(lines)
    drop_records_after(path, 2)
    assert path.read_text() == "".join(lines[:2])
    drop_records_after(path, 0)  # a fresh run in a folder a run was killed in before its first save
    assert not path.exists()
    drop_records_after(path, 0)  # no file: nothing to do
    assert [p.name for p in tmp_path.iterdir()] == []


# ---------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory, tiny_llama_dir, data_file):
    from pesc.training.model import load_base_model, prepare_for_training

    config = load_config(make_config(tmp_path_factory.mktemp("cfg"), tiny_llama_dir, data_file))
    model = prepare_for_training(load_base_model(config), config)
    return model, config


def test_a_training_model_keeps_bitsandbytes_training_layout(qlora_model):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for an inference kernel (no backward) at its
    first eval forward and keeps it: training after the Trainer's evaluation then lost the gradient through the base,
    and ZeRO-3 died saving. pesc turns the repacking off for a model that trains; the attribute must exist (a
    bitsandbytes release that renamed it would silently bring the bug back on such CPUs) and be off on every layer."""
    import bitsandbytes as bnb

    model, _ = qlora_model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)


def test_quantized_base_full_precision_experts(qlora_model):
    import bitsandbytes as bnb

    model, _ = qlora_model
    pesc = model.get_base_model()
    mlp = pesc.model.layers[0].mlp
    assert isinstance(mlp.gate_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(pesc.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    block = mlp.moe_adapter
    assert type(block.router.weight) is nn.Parameter and block.router.weight.dtype == torch.float32
    adapter = block.experts["expert_0"]
    for linear in (adapter.adapter_down, adapter.adapter_up):
        assert isinstance(linear, nn.Linear) and not isinstance(linear, bnb.nn.Linear4bit)
        assert type(linear.weight) is nn.Parameter
    assert adapter.adapter_down.weight.dtype == torch.float32
    assert type(pesc.lm_head) is nn.Linear


def test_experts_match_convert_seed(qlora_model):
    """A dense base upcycled in training gets exactly the experts `pesc convert --seed` draws."""
    from pesc.methods.pesc import initial_expert_state

    model, config = qlora_model
    pesc = model.get_base_model()
    for layer_idx, layer in enumerate(pesc.model.layers):
        expected = initial_expert_state(pesc.config, layer_idx, config["moe"]["seed"])
        state = layer.mlp.moe_adapter.state_dict()
        for name in ("router.weight", "experts.expert_1.adapter_down.weight"):
            torch.testing.assert_close(state[name].float(), expected[name].float(), rtol=0, atol=0)


def _batch(vocab=200):
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (2, 24))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def test_only_lora_and_experts_train_and_get_gradients(qlora_model):
    model, _ = qlora_model
    model.train()
    model.zero_grad(set_to_none=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name or ".moe_adapter." in name, name
    assert any(".router." in n for n in trainable) and any("adapter_up" in n for n in trainable)
    assert any("gate_proj.lora_A" in n for n in trainable) and any("q_proj.lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n or "lm_head" in n or "norm" in n for n in trainable)
    # a step first, so that lora_B and adapter_up (zero at init) are non-zero and every path carries gradient
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**_batch()).loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    out = model(**_batch())
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    model.zero_grad(set_to_none=True)


def test_aux_loss_is_in_the_loss_and_trains_the_routers(qlora_model):
    model, _ = qlora_model
    pesc = model.get_base_model()
    model.eval()  # no dropout: two forwards compute the same thing; gradients still flow
    batch = _batch()
    coef = pesc.config.router_aux_loss_coef
    assert coef == 0.01
    try:
        with_aux = model(**batch)
        pesc.config.router_aux_loss_coef = 0.0
        without = model(**batch)
    finally:
        pesc.config.router_aux_loss_coef = coef
    assert with_aux.aux_loss is not None
    torch.testing.assert_close(with_aux.loss - without.loss, coef * with_aux.aux_loss, rtol=1e-5, atol=1e-6)

    model.zero_grad(set_to_none=True)
    model(input_ids=batch["input_ids"], output_router_logits=True).aux_loss.backward()
    for layer in pesc.model.layers:
        grad = layer.mlp.moe_adapter.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- training runs


def _trained_state(run_dir: Path):
    from safetensors.torch import load_file

    final = run_dir / "final"
    return {**load_file(final / "adapter_model.safetensors"), **load_file(final / "experts.safetensors")}


def assert_curves_picture(path, panels):
    """A PNG of the size `plot_training_curves` draws for `panels` panels, and not blank."""
    import numpy as np
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[:2] == (350, 350 * panels), image.shape  # 3.5 inches a panel (one printed column), 100 DPI
    assert np.asarray(image).std() > 0.05  # lines and text, not one flat colour


def test_training_curves_draw_exactly_the_logged_values(tmp_path):
    from pesc.training.curves import plot_training_curves

    history = [
        {"loss": 2.0, "aux_loss": 1.2, "expert_load_max": 2.5, "step": 1},
        {"loss": 1.5, "aux_loss": 1.1, "expert_load_max": 2.0, "step": 2},
        {"eval_loss": 1.7, "step": 2},
        {"loss": 1.0, "lbc_loss": 0.3, "expert_load_max": 1.5, "step": 3},  # a second named aux loss
        {"train_loss": 1.5, "step": 3},
    ]
    figure = plot_training_curves(history, tmp_path / "curves.png")
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for axes in figure.axes
             for line in axes.get_lines() if not line.get_label().startswith("even")}
    assert drawn == {
        "loss": ([1, 2, 3], [2.0, 1.5, 1.0]),
        "eval_loss": ([2], [1.7]),
        "aux_loss": ([1, 2], [1.2, 1.1]),
        "lbc_loss": ([3], [0.3]),
        "expert_load_max": ([1, 2, 3], [2.5, 2.0, 1.5]),
    }
    assert [axes.get_title() for axes in figure.axes][:3] == ["loss and eval_loss", "aux_loss", "lbc_loss"]
    references = [(axes.get_title(), list(line.get_ydata())) for axes in figure.axes for line in axes.get_lines()
                  if line.get_label() == "even load"]
    assert references == [("aux_loss", [1.0, 1.0]), ("busiest expert's load (x even share)", [1.0, 1.0])]
    # aux_loss 1.1..1.2: the axis holds the data and 1 - 0.05 (1.0 balanced, E·Σf·P), 5% of that span as margin
    margin = 0.05 * (1.2 - 0.95)
    assert figure.axes[1].get_ylim() == pytest.approx((0.95 - margin, 1.2 + margin), rel=1e-12)
    assert_curves_picture(tmp_path / "curves.png", panels=4)
    assert plot_training_curves([{"train_runtime": 1.0, "step": 0}], tmp_path / "none.png") is None


def test_aux_loss_noise_near_1_is_drawn_small_beside_its_balanced_line(tmp_path):
    """aux_loss 1.031-1.038 (noise): the axis spans at least 1 +- 0.05 (+5% margin), so it reads flat, not a trend."""
    from matplotlib.text import Text

    from pesc.training.curves import plot_training_curves

    history = [{"loss": 1.0, "aux_loss": value, "step": step} for step, value in enumerate([1.031, 1.038, 1.034], 1)]
    figure = plot_training_curves(history, tmp_path / "curves.png")
    axes = figure.axes[1]
    assert axes.get_title() == "aux_loss"
    assert [list(line.get_ydata()) for line in axes.get_lines() if line.get_label() == "even load"] == [[1.0, 1.0]]
    low, high = axes.get_ylim()
    assert (low, high) == pytest.approx((0.945, 1.055), rel=1e-12)  # 0.95..1.05 -+ 5% of 0.1
    sizes = [text.get_fontsize() for text in figure.findobj(Text) if text.get_text()]
    assert min(sizes) >= 8  # readable in one printed column


def _step_logs(run_dir: Path) -> list[dict]:
    """The run's per-step log entries (training and eval), without their timings."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [{k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))}
            for entry in history if "loss" in entry or "eval_loss" in entry]


def test_train_resume_equals_uninterrupted(tmp_path, tiny_llama_dir, data_file, monkeypatch):
    """A run killed after checkpoint-3 (steps 4 and 5 already logged) and resumed ends with the weights and logs of an
    uninterrupted run, bit for bit, with evaluation on: at steps 2 and 4 (not save steps) and 6 (one)."""
    from pesc.checkpoint.run_files import load_trained_config
    from pesc.training import train

    with_eval = {"val_set_size": 8, "eval_steps": 2}
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    final = train(str(make_config(full_dir, tiny_llama_dir, data_file, **with_eval)))
    run = full_dir / "run"
    assert final == run / "final"
    for folder in (run / "checkpoint-3", run / "checkpoint-6", final):
        for name in ("adapter_model.safetensors", "adapter_config.json", "experts.safetensors", "pesc_config.json"):
            assert (folder / name).is_file(), folder / name
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (run / "checkpoint-3" / name).is_file()
    assert (run / "pesc_train_config.yaml").is_file()
    saved = load_trained_config(final)
    assert saved.num_experts == 4 and saved.adapter_dim == 8 and not hasattr(saved, "quantization_config")

    logs = _step_logs(run)
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert [entry["step"] for entry in logs if "eval_loss" in entry] == [2, 4, 6]
    assert all("aux_loss" in h and "expert_load_max" in h and "learning_rate" in h for h in logs if "loss" in h)
    load = [json.loads(line) for line in (run / "expert_load.jsonl").read_text().splitlines()]
    assert [record["step"] for record in load] == [1, 2, 3, 4, 5, 6]
    assert len(load[0]["expert_load"]) == 2  # one row per layer
    assert all(abs(sum(row) - 1) < 1e-3 and len(row) == 4 for row in load[0]["expert_load"])
    assert_curves_picture(run / "curves.png", panels=3)  # loss + eval loss, aux_loss, expert_load_max

    # the same run, killed after step 5 had logged (checkpoint-3 is its newest), then resumed
    part_dir = tmp_path / "part"
    part_dir.mkdir()
    config = str(make_config(part_dir, tiny_llama_dir, data_file, **with_eval))
    part = part_dir / "run"
    run_with_crash_at(5, config, monkeypatch, event="on_log")
    assert not (part / "final").exists() and not (part / "checkpoint-6").exists()
    killed_lines = (part / "expert_load.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in killed_lines] == [1, 2, 3, 4, 5]
    with pytest.raises(PescError, match="already holds checkpoints"):
        train(config)
    assert_curves_picture(part / "curves.png", panels=3)  # drawn at the save before the crash
    train(config, resume=True)

    full, resumed = _trained_state(run), _trained_state(part)
    assert full.keys() == resumed.keys() and any("router" in k for k in full)
    for name in full:
        assert torch.equal(resumed[name], full[name]), name
    # the killed run's lines of steps 4 and 5 are gone: every log reads as the uninterrupted run's
    assert (part / "expert_load.jsonl").read_text() == (run / "expert_load.jsonl").read_text()
    assert _step_logs(part) == _step_logs(run)
    assert (part / "curves.png").read_bytes() == (run / "curves.png").read_bytes()


def test_a_run_without_lora_trains_saves_resumes_and_exports_only_the_added_modules(tmp_path, tiny_llama_dir, data_file,
                                                                                     monkeypatch):
    """`lora_target_modules: []`: no peft at all; checkpoints hold the experts file and no model weights; resume
    equals the uninterrupted run; export writes the base tensors untouched and the trained experts."""
    from safetensors.torch import load_file

    from pesc.export import export
    from pesc.training import train

    def config_in(folder):
        folder.mkdir()
        return str(make_config(folder, tiny_llama_dir, data_file, lora_target_modules=[]))

    final = train(config_in(tmp_path / "full"))
    for folder in (final.parent / "checkpoint-3", final):
        names = {p.name for p in folder.iterdir()}
        assert {"experts.safetensors", "pesc_config.json", "tokenizer.json", "training_args.bin"} <= names, names
        assert not names & {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"}, names
    trained = load_file(final / "experts.safetensors")
    history = json.loads((final.parent / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    part = config_in(tmp_path / "part")
    run_with_crash_at(3, part, monkeypatch)
    resumed = load_file(train(part, resume=True) / "experts.safetensors")
    assert trained.keys() == resumed.keys() and any("router" in k for k in trained)
    for name in trained:
        torch.testing.assert_close(resumed[name], trained[name], rtol=0, atol=0, msg=name)

    out = export(final.parent, tmp_path / "export", dtype="float32", log=lambda message: None)
    exported = read_tensors(out)
    base = load_file(tiny_llama_dir / "model.safetensors")
    assert {k for k in exported if ".moe_adapter." not in k} == set(base) - {"lm_head.weight"} or \
        {k for k in exported if ".moe_adapter." not in k} == set(base)
    for name, tensor in base.items():
        if name in exported:
            assert torch.equal(exported[name], tensor.float()), name  # no LoRA merged: the base as it was
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name


def test_resume_restores_experts(tmp_path, tiny_llama_dir, data_file):
    """The experts come back from experts.safetensors, not from the seeded init."""
    from safetensors.torch import load_file

    from pesc.training.model import load_base_model, prepare_for_training
    from pesc.training.trainer import load_experts_into

    config = load_config(make_config(tmp_path, tiny_llama_dir, data_file, load_in_4bit=False, gradient_checkpointing=False))
    model = prepare_for_training(load_base_model(config), config)
    from pesc.checkpoint.run_files import save_trained_state

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".moe_adapter." in name:
                param.add_(1.0)
    save_trained_state(model, model.get_base_model().config, tmp_path / "ckpt")
    fresh = prepare_for_training(load_base_model(config), config)
    assert load_experts_into(fresh, tmp_path / "ckpt") == len(load_file(tmp_path / "ckpt" / "experts.safetensors"))
    ours = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        if ".moe_adapter." in name:
            torch.testing.assert_close(param, ours[name], rtol=0, atol=0)


# ---------------------------------------------------------------- the aux term under gradient accumulation


def test_gradient_accumulation_gives_coef_times_mean_aux_over_micro_batches(tmp_path):
    """Two micro batches of unequal label counts, accumulated: the Trainer's gradient equals, computed here with
    plain torch, that of sum(lm token losses) / all label tokens + coef * mean(aux of each micro batch).

    The experts are at init (adapter_up = 0), so the routers' gradient is the aux term's alone: a rescale of
    the wrong sign or size changes it by its own size. Tolerance: both sides sum the same float32 terms, maybe
    in another order (the Trainer accumulates two backward passes, the reference runs one); measured bit-equal
    here, rtol 1e-5 is far below any rescale error.
    """
    import copy

    from torch.nn import functional as F
    from transformers import TrainingArguments, default_data_collator

    import pesc
    from pesc.testing import build_tiny_dense
    from pesc.testing.training_probe import TrainingProbe
    from pesc.training.trainer import MoETrainer

    coef = 0.01
    model = pesc.upcycle(build_tiny_dense("llama"), num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0,
                         router_aux_loss_coef=coef, seed=0)
    reference = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for masked in (2, 9, 0, 5):  # label tokens per row differ: the LM term is normalised over all of them
        ids = torch.randint(5, 200, (12,), generator=generator)
        labels = ids.clone()
        labels[:masked] = -100
        rows.append({"input_ids": ids, "labels": labels})

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=0.0, max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
    TrainingProbe(trainer, tmp_path / "probe.pt")
    trainer.train()
    trained = torch.load(tmp_path / "probe.pt")["gradients"][0]

    micro_batches = [default_data_collator(rows[:2]), default_data_collator(rows[2:])]
    label_tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro_batches)
    total = 0.0
    for batch in micro_batches:
        out = reference(input_ids=batch["input_ids"], output_router_logits=True)
        logits, labels = out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
        total = total + F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") / label_tokens
        total = total + coef * out.aux_loss / len(micro_batches)
    total.backward()

    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert trained.keys() == expected.keys()
    assert any(".router." in n and g.abs().sum() > 0 for n, g in expected.items())
    for name in sorted(expected, key=lambda name: ".router." not in name):  # the aux term's own gradient first
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-5, atol=1e-9, msg=name)


def test_the_process_group_set_up_during_training_is_destroyed_and_a_callers_is_kept(tmp_path):
    """pesc train destroys the group it set up (left to interpreter shutdown, gloo's threads can abort the
    finished process), also when the run fails, and leaves a group its caller had set up before."""
    import torch.distributed as dist

    from pesc.training.run import process_group_destroyed_at_end

    def init(name):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / name}", rank=0, world_size=1)

    with pytest.raises(RuntimeError, match="a failing run"):
        with process_group_destroyed_at_end():
            init("store-1")
            raise RuntimeError("a failing run")
    assert not dist.is_initialized()

    init("store-2")
    try:
        with process_group_destroyed_at_end():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
