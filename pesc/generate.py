"""`pesc generate`: a quick look at any PESC (converted or exported) or dense model, tokens streamed."""

import sys
from pathlib import Path

from pesc.checkpoint.weights import check_model_weights
from pesc.errors import PescError
from pesc.trust import remote_code_allowed


def build_inputs(tokenizer, prompt: str, system: str | None = None, chat_template: bool = True,
                 encoder_decoder: bool = False) -> dict:
    """Token ids of the prompt: through the tokenizer's chat template when it has one (and it is wanted). An
    encoder-decoder's source reads as training made it (pesc.data.seq2seq): the text's tokens, then EOS."""
    if encoder_decoder:
        import torch

        from pesc.data.seq2seq import Seq2SeqTokenizer

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        template = tokenizer.chat_template if chat_template and getattr(tokenizer, "chat_template", None) else None
        source = Seq2SeqTokenizer(tokenizer, template)
        ids = source.source_ids(source.source_text(messages))
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    text = f"{system}\n\n{prompt}" if system else prompt
    encoded = tokenizer(text, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def check_model_folder(path: str | Path, trust_remote_code: bool = False) -> None:
    """A folder with config.json and complete weight files (headers read, nothing loaded), whose code (if it needs
    its own) the user trusts."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PescError(f"{path} is not a model folder (no config.json): give an exported or converted model")
    check_model_weights(path)
    remote_code_allowed(path, trust_remote_code)


def is_encoder_decoder(path: str | Path) -> bool:
    """Whether the folder's config.json is an encoder-decoder's (T5), read without transformers."""
    import json

    return bool(json.loads((Path(path) / "config.json").read_text()).get("is_encoder_decoder", False))


def load_folder_model(path: str | Path, dtype="auto", trust_remote_code: bool = False):
    """The model of a folder, in eval mode: AutoModelForCausalLM, or AutoModelForSeq2SeqLM where config.json says
    is_encoder_decoder (T5); a pesc method's code comes from the installed pesc, never the folder.

    Commands check the folder first (`check_model_folder`), before torch and transformers import."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from pesc.methods import register_auto_classes

    register_auto_classes()

    trusted = remote_code_allowed(path, trust_remote_code)
    try:
        auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(path) else AutoModelForCausalLM
        return auto_class.from_pretrained(path, trust_remote_code=trusted, dtype=dtype).eval()
    except RuntimeError as error:
        if "mismatched" not in str(error):
            raise
        raise PescError(f"{path}: its weights don't match its config.json (the load report above names the tensors "
                        "whose shapes differ): check that config.json belongs to these weights") from None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, running the folder's code only where the user trusts it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code_allowed(path, trust_remote_code))


def load_model(path: str | Path, device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) of a model folder (a causal LM, or an encoder-decoder with AutoModelForSeq2SeqLM), on the
    GPU when there is one."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the terminal is for the generated tokens
    model = load_folder_model(path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tokenizer


def generate(
    path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    system: str | None = None,
    chat_template: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    stream=None,
    trust_remote_code: bool = False,
) -> str:
    """Generate a reply to `prompt`, streaming it to `stream` (stdout); returns the generated text."""
    if max_new_tokens <= 0:
        raise PescError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not temperature >= 0:  # NaN too
        raise PescError(f"--temperature must be a number >= 0, got {temperature}")
    check_model_folder(path, trust_remote_code)  # before torch and transformers import: bad input fails at once
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, TextStreamer

    model, tokenizer = load_model(path, trust_remote_code=trust_remote_code)
    encoder_decoder = model.config.is_encoder_decoder
    inputs = {k: v.to(model.device)
              for k, v in build_inputs(tokenizer, prompt, system, chat_template, encoder_decoder).items()}

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out = stream or sys.stdout
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    class _RefuseNonFinite(LogitsProcessor):
        """A NaN or +inf score would pick a token silently (often a special one, so nothing prints): stop instead.
        (-inf is left alone: sampling's top-k / top-p put it there on purpose.)"""

        def __call__(self, input_ids, scores):
            if scores.isnan().any() or scores.isposinf().any():
                raise PescError(f"{path} computes non-finite logits (NaN or inf): its weights are damaged, so it "
                                "cannot generate; check them with `pesc compare` against its base")
            return scores

    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad,
            logits_processor=LogitsProcessorList([_RefuseNonFinite()]), **sampling
        )
    # a causal LM's output continues the prompt; an encoder-decoder's is the decoder's, after its start token
    start = 1 if encoder_decoder else inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0, start:], skip_special_tokens=True)
