"""`pesc generate`: chat template applied, tokens streamed, for exported, converted and dense models."""

import io

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pesc.cli import main
from pesc.export import export
from pesc.generate import build_inputs, generate
from pesc.testing import build_tiny_tokenizer
from pesc.testing.trained_run import save_fake_trained_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("generate")
    save_fake_trained_run(root / "run", tiny_llama_dir)
    return export(root / "run", root / "pesc-tiny", dtype="float32", log=lambda message: None)


def _greedy_reply(folder, input_ids, max_new_tokens):
    """Independent reference: argmax of the full forward, one token at a time (no cache, no generate())."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = ids[0, input_ids.shape[1] :]
    return AutoTokenizer.from_pretrained(folder).decode(new, skip_special_tokens=True), new


def test_generate_streams_the_greedy_reply_of_the_exported_model(exported, capsys):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected, tokens = _greedy_reply(exported, chat["input_ids"], 8)
    plain = tokenizer("What is two plus two?", return_tensors="pt")["input_ids"]
    assert not torch.equal(_greedy_reply(exported, plain, 8)[1], tokens)  # so the test sees the template applied
    stream = io.StringIO()
    assert generate(exported, "What is two plus two?", max_new_tokens=8, stream=stream) == expected
    assert stream.getvalue() == expected + "\n"
    capsys.readouterr()
    main(["generate", str(exported), "--prompt", "What is two plus two?", "--max-new-tokens", "8"])
    assert capsys.readouterr().out == expected + "\n"


def test_generate_plain_prompt_and_dense_model(tiny_llama_dir, capsys):
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)("Hello", return_tensors="pt")["input_ids"]
    expected, _ = _greedy_reply(tiny_llama_dir, ids, 4)
    main(["generate", str(tiny_llama_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--no-chat-template"])
    assert capsys.readouterr().out == expected + "\n"


def test_generate_samples_with_the_temperature_and_seed(tiny_llama_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    inputs = tokenizer("Hello", return_tensors="pt")
    torch.manual_seed(0)  # pesc generate's default --seed
    sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=0.7,
                             pad_token_id=tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1] :]
    greedy, _ = _greedy_reply(tiny_llama_dir, inputs["input_ids"], 6)
    expected = tokenizer.decode(sampled, skip_special_tokens=True)
    assert expected != greedy  # else this test could not tell sampling from greedy decoding
    main(["generate", str(tiny_llama_dir), "--prompt", "Hello", "--max-new-tokens", "6", "--no-chat-template",
          "--temperature", "0.7"])
    assert capsys.readouterr().out == expected + "\n"


def test_chat_template_is_applied():
    tokenizer = build_tiny_tokenizer()
    chat = tokenizer.decode(build_inputs(tokenizer, "Hi", system="Be brief.")["input_ids"][0])
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>") and chat.endswith("<|im_start|>assistant\n")
    plain = tokenizer.decode(build_inputs(tokenizer, "Hi", chat_template=False)["input_ids"][0])
    assert "<|im_start|>" not in plain and plain.endswith("Hi")


def test_generate_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path), "--prompt", "Hi"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model folder" in err[0]


def test_generate_on_a_t5_streams_the_greedy_reply_of_its_decoder(tmp_path, capsys):
    """A converted MoV T5 (its vectors and routers perturbed off the dense model): the source is the prompt's tokens
    and EOS, as training makes it; the reply equals an argmax loop over full forwards of AutoModelForSeq2SeqLM, the
    decoder input growing from the start token (no cache, no generate())."""
    from transformers import AutoModelForSeq2SeqLM

    from pesc.convert import ConvertSettings, convert
    from pesc.methods import get_method, register_auto_classes
    from pesc.testing.tiny import build_tiny_t5_tokenizer
    from pesc.testing.tiny_t5 import save_tiny_t5
    from helpers import perturb_added

    dense = save_tiny_t5(tmp_path / "t5", "t5-v1.1")
    tokenizer = build_tiny_t5_tokenizer()
    convert(dense, tmp_path / "mov-t5", ConvertSettings("mov", num_experts=4), echo=lambda _: None)
    register_auto_classes()
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "mov-t5", dtype=torch.float32).eval()
    perturb_added(model, get_method("mov"), scale=0.5)
    folder = tmp_path / "perturbed"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    prompt = "What is 2 + 3?"
    source = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
    assert torch.equal(build_inputs(tokenizer, prompt, encoder_decoder=True)["input_ids"], source)
    decoded = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(6):
            next_token = model(input_ids=source, decoder_input_ids=decoded).logits[:, -1].argmax(-1, keepdim=True)
            decoded = torch.cat([decoded, next_token], dim=1)
    expected = tokenizer.decode(decoded[0, 1:], skip_special_tokens=True)
    stream = io.StringIO()
    assert generate(folder, prompt, max_new_tokens=6, stream=stream) == expected
    assert stream.getvalue().strip() == expected.strip()
