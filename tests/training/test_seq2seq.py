"""`pesc train` on a T5 encoder-decoder (MoV and MoLoRA, as the paper trained them): prompt -> target examples, the
loss on the target alone, a QLoRA 4-bit base, resume, and an export that loads and generates without pesc."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from pesc.data.masking import IGNORE_INDEX
from pesc.data.seq2seq import Seq2SeqCollator, Seq2SeqTokenizer
from pesc.errors import PescError
from pesc.testing.tiny import build_tiny_t5_tokenizer
from pesc.testing.tiny_t5 import save_tiny_t5
from helpers import make_config, read_tensors, run_with_crash_at


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A tiny dense T5 v1.1 (gated-GELU, Flan-T5's layout) with a T5-style tokenizer (<pad> 0, </s> 1)."""
    folder = save_tiny_t5(tmp_path_factory.mktemp("t5") / "t5-v1.1", "t5-v1.1")
    build_tiny_t5_tokenizer().save_pretrained(folder)
    return folder


def t5_config(folder, base, method="mov", **overrides):
    """A 4-step run of `method` on the tiny T5 over the shipped input/target demo rows, checkpoints every 2 steps."""
    moe = {"num_experts": 4, "seed": 0}
    if method == "molora":
        moe["expert_rank"] = 2
    config = {
        "base_model": str(base), "method": method, "moe": moe,
        "datasets": [{"path": "pesc:tiny_t5_sums.jsonl", "type": "input_target"}],
        "sequence_len": 16, "target_len": 4, "sample_packing": False,
        "micro_batch_size": 8, "max_steps": 4, "learning_rate": 0.05, "warmup_ratio": 0.0, "max_grad_norm": 1.0,
        "gradient_checkpointing": True, "bf16": False, "output_dir": str(folder / "run"),
        "logging_steps": 1, "save_steps": 2,
    }
    config.update(overrides)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _losses(run_dir):
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# ---------------------------------------------------------------- the examples


def test_source_is_the_prompt_and_labels_are_the_target_alone():
    """Worked by hand on two rows: an input_target row and an alpaca row (instruction + input, as the decoder path's
    user turn reads it), batched; then the source as a chat template renders it; then truncation."""
    from pesc.data.formats import make_converter

    tokenizer = build_tiny_t5_tokenizer()
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [
        make_converter("input_target")({"input": "What is 2 + 3?", "target": "5"}),
        make_converter("alpaca")({"instruction": "Add.", "input": "4 + 4", "output": "four plus four is 8"}),
    ]
    tokenize = Seq2SeqTokenizer(tokenizer, template=None)
    sources, targets = tokenize(rows, source_len=64, target_len=64)
    assert sources == [words("What is 2 + 3?") + [eos], words("Add.\n\n4 + 4") + [eos]]
    assert targets == [words("5") + [eos], words("four plus four is 8") + [eos]]
    n0, n1 = len(targets[0]), len(targets[1])
    assert n0 < n1  # the first row's target is padded

    batch = Seq2SeqCollator(pad)([{"input_ids": s, "labels": t} for s, t in zip(sources, targets)])
    assert batch["labels"].shape == (2, n1)
    # -100 exactly at the first row's padding, positions n0 .. n1 - 1; nothing of either source is in the labels
    assert (batch["labels"] == IGNORE_INDEX).nonzero().tolist() == [[0, i] for i in range(n0, n1)]
    assert batch["labels"][0, :n0].tolist() == targets[0] and batch["labels"][1].tolist() == targets[1]
    m0 = len(sources[0])
    assert batch["input_ids"][0, :m0].tolist() == sources[0] and batch["attention_mask"][0].tolist() == (
        [1] * m0 + [0] * (batch["input_ids"].shape[1] - m0))

    # with a template, the source is its render of the turns before the answer, with the generation prompt
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "5"}]
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    sources, targets = Seq2SeqTokenizer(tokenizer, template)([chat], source_len=64, target_len=64)
    assert sources == [words("system: Be brief.\nuser: 2 + 3?\nassistant: ") + [eos]]
    assert targets == [words("5") + [eos]]

    # truncation keeps the EOS: the source to source_len tokens, the target to target_len
    sources, targets = tokenize(rows[1:], source_len=3, target_len=2)
    assert sources == [words("Add.\n\n4 + 4")[:2] + [eos]] and targets == [words("four plus four is 8")[:1] + [eos]]


def test_a_second_answer_needs_a_template():
    from pesc.data.formats import RowError

    chat = [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "1"},
            {"role": "user", "content": "2?"}, {"role": "assistant", "content": "2"}]
    with pytest.raises(RowError, match="more than one answer: set chat_template"):
        Seq2SeqTokenizer(build_tiny_t5_tokenizer(), None)([chat], 16, 16)


def test_the_loss_is_cross_entropy_on_the_target_tokens_only(tiny_t5_dir):
    """The model's loss on a collated batch equals a cross-entropy written here over the target positions alone, with
    the decoder input built by hand: the start token, then the target shifted right (padding read as <pad>)."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir, dtype=torch.float64).eval()
    batch = Seq2SeqCollator(0)([{"input_ids": [5, 6, 7, 1], "labels": [8, 9, 1]},
                                {"input_ids": [10, 1], "labels": [11, 1]}])
    decoder_input_ids = torch.tensor([[0, 8, 9], [0, 11, 0]])  # start 0; -100 under the second row read as pad 0
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids).logits
    targets = [(0, 0, 8), (0, 1, 9), (0, 2, 1), (1, 0, 11), (1, 1, 1)]  # (row, position, token): 5 tokens, no padding
    expected = -sum(torch.log_softmax(logits[r, p], -1)[t] for r, p, t in targets) / len(targets)
    # float64 on both sides, the same sums in another order: ~1e-15 apart
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- training


# bitsandbytes' 4-bit matmul is slow on the CPU (~30 ms a call at any size): gradient checkpointing, which runs each
# forward twice, is covered on one method
@pytest.mark.parametrize("method, checkpointing", [("mov", True), ("molora", False)])
def test_t5_trains_on_a_4bit_base_and_its_export_generates_without_pesc(tmp_path, tiny_t5_dir, method, checkpointing):
    """The T5 linears bitsandbytes quantizes (q, k, v, o, wi_0, wi_1; `wo` stays in full precision, T5 keeps it in
    float32, and so does the LM head), only the method's modules train, in float32; the loss falls; the export loads
    with AutoModelForSeq2SeqLM where pesc is not installed and computes and generates what pesc's load of it does."""
    import bitsandbytes as bnb

    from pesc.export import export
    from pesc.methods import get_method
    from pesc.testing.isolated import run_without_pesc
    from pesc.training import train
    from pesc.training.config import load_config
    from pesc.training.model import load_base_model, prepare_for_training

    config_path = t5_config(tmp_path, tiny_t5_dir, method, gradient_checkpointing=checkpointing)
    config = load_config(config_path)
    model = load_base_model(config)
    added = get_method(method)
    for layer_idx, prefix in enumerate(added.layer_prefixes(model.config)):  # the draws `pesc convert --seed 0` makes
        block = model.get_submodule(prefix.rstrip("."))
        for name, tensor in added.initial_state(model.config, layer_idx, seed=0).items():
            assert torch.equal(block.get_parameter(name), tensor), prefix + name
    model = prepare_for_training(model, config)
    linears = {name.rsplit(".", 1)[-1]: type(module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)}
    assert {name for name, kind in linears.items() if kind is bnb.nn.Linear4bit} == {"q", "k", "v", "o", "wi_0", "wi_1"}
    assert linears["wo"] is nn.Linear and linears["lm_head"] is nn.Linear
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(added.is_added(name) for name in trainable)
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in trainable.values())
    assert any(name.startswith("encoder.") for name in trainable) and any(".EncDecAttention." in n for n in trainable)
    del model

    final = train(config_path)
    losses = _losses(final.parent)
    # 4 steps of lr 0.05 on the 64 sums take the loss from ~4.6 down by more than 0.3 (seen: 0.5 and more); a batch's
    # own noise is about 0.1, so 0.2 tells learning from noise
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses

    out = export(final.parent, tmp_path / "export", dtype="float32", log=lambda message: None)
    trained = load_file(final / "experts.safetensors")
    exported = read_tensors(out)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    ids = [[5, 6, 7, 8, 1]]
    isolated = run_without_pesc(f"""
        import torch
        from transformers import AutoModelForSeq2SeqLM
        model = AutoModelForSeq2SeqLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.tensor({ids!r})
        with torch.no_grad():
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 9, 10]])).logits
            tokens = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        emit({{"class": type(model).__name__, "logits": logits.tolist(), "tokens": tokens.tolist()}})
    """)
    from transformers import AutoModelForSeq2SeqLM

    from pesc.methods import register_auto_classes

    register_auto_classes()
    ours = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ours(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor([[0, 9, 10]])).logits
        tokens = ours.generate(torch.tensor(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert isolated["class"] == f"{added.label}ForConditionalGeneration"
    # the same float32 code on the same weights in another process: equal but for the order of a few sums (~1e-7)
    torch.testing.assert_close(torch.tensor(isolated["logits"]), logits, rtol=0, atol=1e-5)
    assert isolated["tokens"] == tokens.tolist() and len(tokens[0]) == 5  # the start token and 4 new ones


def test_t5_resume_equals_uninterrupted(tmp_path, tiny_t5_dir, monkeypatch):
    """A T5 run killed right after checkpoint-2 and resumed ends with the vectors and routers (and the loss log) of
    the uninterrupted run, bit for bit (a float32 base: the 4-bit one is covered above, and is slow on the CPU)."""
    from pesc.training import train

    def config_in(name):
        (tmp_path / name).mkdir()
        return t5_config(tmp_path / name, tiny_t5_dir, "mov", gradient_checkpointing=False, load_in_4bit=False,
                         torch_dtype="float32")

    full = train(config_in("full"))
    part = config_in("part")
    run_with_crash_at(2, part, monkeypatch)
    resumed = train(part, resume=True)
    expected, got = load_file(full / "experts.safetensors"), load_file(resumed / "experts.safetensors")
    assert expected.keys() == got.keys() and any("router" in name for name in expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _losses(resumed.parent) == _losses(full.parent)
    # the expert load, from the routing records (T5 has no aux losses): a row per site and block, MoV's 4 key and 4
    # value heads per attention plus the FFN activation (encoder: 9 a block, decoder with cross-attention: 17), each
    # site's load over its own real tokens summing to 1 (float32 sums rounded to 5 digits: 1e-4); the resumed run's
    # file is the uninterrupted run's
    load = (full.parent / "expert_load.jsonl").read_text()
    assert load == (resumed.parent / "expert_load.jsonl").read_text()
    steps = [json.loads(line) for line in load.splitlines()]
    assert [step["step"] for step in steps] == [1, 2, 3, 4]
    for step in steps:
        assert len(step["expert_load"]) == 2 * 9 + 2 * 17
        assert all(len(row) == 4 and abs(sum(row) - 1) < 1e-4 for row in step["expert_load"])
    history = json.loads((full.parent / "trainer_state.json").read_text())["log_history"]
    assert all(entry["expert_load_max"] >= 1 for entry in history if "loss" in entry)


def test_tiny_model_t5_is_a_t5_v1_1_whose_tokenizer_has_t5s_ids(tmp_path, capsys):
    """`pesc tiny-model --family t5`, the base of the recipe mov-t5-tiny (which also trains MoLoRA by --set)."""
    from transformers import AutoConfig, AutoTokenizer

    from helpers import run_cli
    from pesc.training.config import load_config

    code, _, err = run_cli(capsys, "tiny-model", tmp_path / "t5", "--family", "t5")
    assert code == 0, err
    config, tokenizer = AutoConfig.from_pretrained(tmp_path / "t5"), AutoTokenizer.from_pretrained(tmp_path / "t5")
    assert config.is_encoder_decoder and config.feed_forward_proj == "gated-gelu"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (config.pad_token_id, config.eos_token_id) == (0, 1)
    assert len(tokenizer) == config.vocab_size
    assert load_config("mov-t5-tiny", ["method=molora"])["method"] == "molora"


# ---------------------------------------------------------------- refusals, before the model loads


@pytest.mark.parametrize("overrides, message", [
    ({"sample_packing": True}, "sample_packing: an encoder-decoder (T5) trains on padded batches"),
    ({"lora_target_modules": ["q"]}, "lora_target_modules: LoRA on a T5 base is not supported yet"),
    ({"method": "pesc", "moe": {"num_experts": 4, "top_k": 2}}, "PESC cannot wrap model family 't5'"),
])
def test_t5_settings_that_cannot_train_are_refused_in_one_line(tmp_path, tiny_t5_dir, overrides, message, monkeypatch):
    from pesc.training import model as training_model
    from pesc.training import train

    monkeypatch.setattr(training_model, "load_base_model", lambda config: pytest.fail("the model loaded"))
    with pytest.raises(PescError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        train(t5_config(tmp_path, tiny_t5_dir, **overrides))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_target_len_on_a_decoder_is_refused(tmp_path, tiny_llama_dir, data_file):
    from pesc.training import train

    with pytest.raises(PescError, match="target_len applies to encoder-decoder models"):
        train(str(make_config(tmp_path, tiny_llama_dir, data_file, target_len=8)))


def test_t5_expert_load_counts_each_side_over_its_own_real_tokens(tiny_t5_dir, tmp_path):
    """The trainer's expert-load counts of one padded T5 batch (no aux losses) equal the summed router probabilities
    of its rows run one at a time unpadded: the encoder sites over the sources, the decoder sites over the targets."""
    from transformers import AutoModelForSeq2SeqLM, TrainingArguments

    from pesc.methods import register_auto_classes
    from pesc.testing.perturbed import save_perturbed_checkpoint
    from pesc.training.trainer import MoETrainer

    register_auto_classes()
    folder = save_perturbed_checkpoint(tiny_t5_dir, tmp_path / "mov", "mov", scale=0.5, num_experts=4)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).train()
    rows = [{"input_ids": [5, 6, 7, 8, 9, 1], "labels": [8, 1]}, {"input_ids": [10, 1], "labels": [11, 12, 13, 1]}]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True)
    trainer = MoETrainer(model=model, args=args, train_dataset=rows, data_collator=Seq2SeqCollator(0))
    trainer.compute_loss(model, Seq2SeqCollator(0)(rows))
    expected = 0
    with torch.no_grad():
        for row in rows:
            records = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]),
                            output_routing_records=True).routing_records
            expected = expected + torch.stack([torch.softmax(r.logits.double(), -1).sum(0) for r in records])
    # both float32 router logits, padded batch vs single rows: probabilities ~1e-7 apart, summed over <= 8 tokens
    torch.testing.assert_close(trainer._load_counts, expected, rtol=0, atol=1e-5)
