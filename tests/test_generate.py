"""`pesc generate`: chat template applied, tokens streamed, for exported, converted and dense models."""

import io

import pytest

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


def test_generate_streams_the_reply(exported, capsys):
    stream = io.StringIO()
    text = generate(exported, "What is two plus two?", max_new_tokens=8, stream=stream)
    assert text and stream.getvalue() == text + "\n"
    capsys.readouterr()
    main(["generate", str(exported), "--prompt", "What is two plus two?", "--max-new-tokens", "8"])
    assert capsys.readouterr().out == text + "\n"  # greedy: the same tokens, printed to the terminal


def test_generate_plain_prompt_and_dense_model(tiny_llama_dir, capsys):
    main(["generate", str(tiny_llama_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--no-chat-template",
          "--temperature", "0.7"])
    assert capsys.readouterr().out.strip()


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
