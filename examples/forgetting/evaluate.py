"""What a model does after training: greedy replies scored by exact match (the knowledge probe and the downstream
tasks) and the language-model loss on held-out rows. The model is loaded by pesc's own loaders (a model folder or
a training run, base + trained modules + LoRA unmerged: pesc.evaluation.loading), the prompts rendered by the
model's chat template, the held-out rows tokenized and masked by pesc's training data pipeline.
"""

import torch

from forgetting.scoring import exact_match


def load(path):
    """(model, tokenizer) of a model folder or a training run, as `pesc eval` and `pesc routes` load it."""
    from pesc.evaluation.loading import check_eval_source, load_eval_model

    check_eval_source(path)
    loaded = load_eval_model(path, dtype="float32")
    return loaded.model, loaded.tokenizer


def prompt_text(tokenizer, question: str, stem: str = "") -> str:
    """The question as the user's turn, the assistant's turn opened (the chat template's generation prompt) and
    started with `stem` (the probe's prefill), as text."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return text + stem


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of the prompts (text), batch by batch with left padding, in the order given."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts[start:start + batch_size]]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies


def probe(model, tokenizer, facts, max_new_tokens: int) -> list[dict]:
    """Each fact's question asked with its stem prefilled: {key, reply, correct}."""
    replies = greedy_replies(model, tokenizer, [prompt_text(tokenizer, f.question, f.stem) for f in facts],
                             max_new_tokens)
    return [{"key": f.key, "reply": reply, "correct": exact_match(reply, list(f.answers))}
            for f, reply in zip(facts, replies)]


def downstream(model, tokenizer, items: list[dict], max_new_tokens: int) -> list[dict]:
    """Each downstream question answered from scratch: {task, question, reply, correct}."""
    replies = greedy_replies(model, tokenizer, [prompt_text(tokenizer, item["question"]) for item in items],
                             max_new_tokens)
    return [{"task": item["task"], "question": item["question"], "reply": reply,
             "correct": exact_match(reply, [item["answer"]])} for item, reply in zip(items, replies)]


@torch.no_grad()
def heldout_loss(model, tokenizer, path, sequence_len: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token of the rows in `path` (a messages file), tokenized, masked (answers
    only) and padded by pesc's training pipeline; the language-model loss alone, no aux loss of any method."""
    from pesc.data import load_training_data, make_collator

    rows, _ = load_training_data([{"path": str(path), "type": "messages"}], tokenizer, chat_template=None,
                                 sequence_len=sequence_len)
    collate = make_collator(tokenizer, sample_packing=False)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        inputs = {name: batch[name].to(device) for name in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits
        labels = batch["labels"][:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                         ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / count
