"""Data pipeline: formats, templates, assistant-only labels, truncation, splits, mixing, errors, packing."""

import json
import logging

import pytest
import torch
from datasets import Dataset

from pesc import upcycle
from pesc.data import CHAT_TEMPLATES, DATASET_TYPES, check_dataset_entry, load_training_data, make_collator
from pesc.errors import PescError
from pesc.testing import build_tiny_dense, build_tiny_tokenizer

SYSTEM = "Be brief."
TURNS = [("What is 2 + 3?", "2 + 3 = 5."), ("And 4 + 4?", "4 + 4 = 8, I think.")]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


SINGLE_TURN = ("alpaca", "input_target")  # the formats of one prompt and one answer, without a system prompt


def row_in(kind, turns=TURNS, system=SYSTEM):
    """One conversation written in each dataset format."""
    if kind == "messages":
        msgs = [{"role": "system", "content": system}] if system else []
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": msgs}
    if kind == "sharegpt":
        conv = [{"from": "system", "value": system}] if system else []
        for q, a in turns:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        return {"conversations": conv}
    if kind == "alpaca":
        (q, a), = turns
        return {"instruction": q, "input": "", "output": a}
    if kind == "input_target":
        (q, a), = turns
        return {"input": q, "target": a}
    if kind == "camelidae":
        return {"corpus": "", "dataset": "math", "instruction": system or "",
                "conversation": [{"input": q, "output": a} for q, a in turns]}
    raise AssertionError(kind)


def trainable_spans(tok, ids, labels):
    """Decoded runs of consecutive trained tokens; also checks each trained label equals its input id."""
    spans, run = [], []
    for token, label in zip(ids, labels):
        if label == -100:
            if run:
                spans.append(tok.decode(run))
                run = []
        else:
            assert label == token
            run.append(token)
    if run:
        spans.append(tok.decode(run))
    return spans


def load(tok, path, kind, template="chatml", **kwargs):
    kwargs.setdefault("sequence_len", 512)
    train, _ = load_training_data([{"path": str(path), "type": kind}], tok, chat_template=template, **kwargs)
    return train


@pytest.mark.parametrize("template", ["chatml", "camelidae"])
@pytest.mark.parametrize("kind", DATASET_TYPES)
def test_labels_only_on_assistant_tokens(tmp_path, tok, kind, template):
    turns = TURNS[:1] if kind in SINGLE_TURN else TURNS
    system = None if kind in SINGLE_TURN else SYSTEM
    path = write_jsonl(tmp_path / "d.jsonl", [row_in(kind, turns, system)])
    train = load(tok, path, kind, template)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    assert trainable_spans(tok, ids, labels) == [a + tok.eos_token for _, a in turns]
    if template == "camelidae":  # the reference prompt, exactly
        text = "<|endoftext|>" + (f"### System:\n{system}\n" if system else "")
        text += "".join(f"### Human:\n{q}\n### Assistant:\n{a}<|im_end|>" for q, a in turns)
    else:
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        text += "".join(
            f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in turns
        )
    assert tok.decode(ids) == text


def test_template_choices(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [row_in("messages")])
    own = load(tok, path, "messages", template=None)[0]
    named = load(tok, path, "messages", template="chatml")[0]
    assert own == named  # the tiny tokenizer's own template is ChatML
    literal = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    row = load(tok, path, "messages", template=literal)[0]
    assert tok.decode(row["input_ids"]).startswith("system: Be brief.\nuser: What is 2 + 3?\nassistant: 2 + 3")
    assert trainable_spans(tok, row["input_ids"], row["labels"]) == [a + "<|im_end|>" for _, a in TURNS]
    assert set(CHAT_TEMPLATES) >= {"camelidae", "chatml"}
    with pytest.raises(PescError, match="unknown chat_template 'nope'"):
        load(tok, path, "messages", template="nope")


def test_template_rewriting_history_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [row_in("messages")])
    # renders a different text depending on the number of messages: no turn-by-turn mask is possible
    bad = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(PescError, match=r"d\.jsonl: row 1: .*chat template"):
        load(tok, path, "messages", template=bad)


def test_truncation_and_dropped_rows(tmp_path, tok, caplog):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [row_in("messages"), long_prompt])
    full = sorted(load(tok, path, "messages"), key=lambda r: len(r["input_ids"]))
    assert len(full) == 2
    whole = [r for r in full if "Be brief" in tok.decode(r["input_ids"])][0]
    first_trained = next(i for i, label in enumerate(whole["labels"]) if label != -100)
    cut_len = first_trained + 3  # keeps three tokens of the first answer, loses the rest of the row
    prompt_len = next(i for i, label in enumerate(full[0]["labels"] if full[0] is not whole else full[1]["labels"])
                      if label != -100)
    assert prompt_len > cut_len  # so the long prompt row loses its answer entirely
    with caplog.at_level(logging.WARNING, logger="pesc.data"):
        cut = load(tok, path, "messages", sequence_len=cut_len, max_dropped_fraction=0.5)
    assert f"sequence_len={cut_len} drops 1 of 2 rows (50%; {path}: 1 of 2) whose prompt alone fills it" in caplog.text
    assert len(cut) == 1
    assert cut[0]["input_ids"] == whole["input_ids"][:cut_len] and cut[0]["labels"] == whole["labels"][:cut_len]
    assert sum(label != -100 for label in cut[0]["labels"]) == 3
    with pytest.raises(PescError, match="drops 1 of 2 rows .* more than max_dropped_fraction=0.1: raise sequence_len"):
        load(tok, path, "messages", sequence_len=cut_len)  # the default allows 10%
    with pytest.raises(PescError, match="no training rows left: sequence_len=.* drops 1 of 1 rows"):
        load(tok, write_jsonl(tmp_path / "long.jsonl", [long_prompt]), "messages", sequence_len=cut_len,
             max_dropped_fraction=1)


def test_dropped_rows_are_reported_once_at_the_end_over_all_datasets(tmp_path, tok, caplog):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]}
    first = write_jsonl(tmp_path / "a.jsonl", rows_of(9) + [long_prompt])
    second = write_jsonl(tmp_path / "b.jsonl", rows_of(10))
    entries = [{"path": str(first), "type": "messages"}, {"path": str(second), "type": "messages"}]
    with caplog.at_level(logging.INFO, logger="pesc.data"):
        train, _ = load_training_data(entries, tok, chat_template="chatml", sequence_len=24)
    assert len(train) == 19  # 1 of 20 rows dropped: 5%, under the default 10%
    last = caplog.records[-1]
    assert last.levelno == logging.WARNING
    assert last.getMessage() == (f"sequence_len=24 drops 1 of 20 rows (5%; {first}: 1 of 10) whose prompt alone "
                                 "fills it, leaving no answer token; raise sequence_len to keep them")


@pytest.mark.parametrize("kind", DATASET_TYPES)
def test_a_row_with_only_empty_answers_is_refused_by_name(tmp_path, tok, kind):
    empty = row_in(kind, [("What is 2 + 3?", " ")] if kind in SINGLE_TURN else [("Hi", ""), ("Still there?", "\n")])
    path = write_jsonl(tmp_path / "d.jsonl", [row_in(kind, TURNS[:1]), empty])
    with pytest.raises(PescError) as error:
        load(tok, path, kind)
    assert str(error.value) == (f"{path}: row 2: every assistant answer is empty, so only the end-of-turn token "
                                "would train: fill the answer in or remove the row")
    one_empty = row_in("messages", [("Hi", ""), ("Still there?", "Yes.")])  # something to learn: kept
    kept = load(tok, write_jsonl(tmp_path / "one.jsonl", [one_empty]), "messages")
    assert trainable_spans(tok, kept[0]["input_ids"], kept[0]["labels"]) == [tok.eos_token, "Yes." + tok.eos_token]


def rows_of(n, tag="q"):
    return [{"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


@pytest.mark.parametrize("size, n_eval", [(0, 0), (0.0, 0), (0.25, 5), (3, 3), (0.01, 1)])
def test_val_split_sizes(tmp_path, tok, size, n_eval):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(20))
    train, ev = load_training_data([{"path": str(path), "type": "messages"}], tok, chat_template="chatml",
                                   sequence_len=64, val_set_size=size, seed=1)
    assert len(train) == 20 - n_eval
    assert (ev is None) if n_eval == 0 else len(ev) == n_eval
    if ev is not None:  # disjoint
        assert not {tuple(r) for r in train["input_ids"]} & {tuple(r) for r in ev["input_ids"]}


@pytest.mark.parametrize("size", [-1, 1.0, 1.5, 20, "0.1", True])
def test_bad_val_split(tmp_path, tok, size):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(20))
    with pytest.raises(PescError, match="val_set_size"):
        load(tok, path, "messages", val_set_size=size)


def test_mixing_and_seeded_shuffle(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(6, "first"))
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"second{i}", "output": f"b{i}"} for i in range(4)])
    entries = [{"path": str(a), "type": "messages"}, {"path": str(b), "type": "alpaca"}]

    def texts(seed):
        train, _ = load_training_data(entries, tok, chat_template="chatml", sequence_len=64, seed=seed)
        return [tok.decode(r) for r in train["input_ids"]]

    once, again, other = texts(0), texts(0), texts(1)
    assert len(once) == 10 and once == again and once != other
    assert sum("first" in t for t in once) == 6 and sum("second" in t for t in once) == 4
    assert [("first" in t) for t in once] != [True] * 6 + [False] * 4  # mixed, not appended


def test_parquet_and_json_array(tmp_path, tok):
    rows = [row_in("sharegpt")] * 3
    Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        train = load(tok, tmp_path / name, "sharegpt")
        assert len(train) == 3
        assert trainable_spans(tok, train[0]["input_ids"], train[0]["labels"]) == [a + "<|im_end|>" for _, a in TURNS]


def test_field_override(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chat": row_in("messages")["messages"]}])
    train, _ = load_training_data([{"path": str(path), "type": "messages", "field": "chat"}], tok,
                                  chat_template="chatml", sequence_len=512)
    assert len(train) == 1


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, message", [
    ({"msgs": []}, "missing key 'messages'"),
    ({"messages": "hi"}, "'messages' must be a list, got str"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"content must be a string, got int"),
    ({"messages": [{"role": "user"}]}, "missing key 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_malformed_messages_row_names_file_and_row(tmp_path, tok, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(PescError, match=rf"bad\.jsonl: row 3: .*{message}"):
        load(tok, path, "messages")


@pytest.mark.parametrize("kind, bad, message", [
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
    ("alpaca", {"instruction": "x"}, "missing key 'output'"),
    ("alpaca", {"instruction": ["x"], "output": "y"}, "'instruction' must be a string"),
    ("camelidae", {"instruction": "", "conversation": []}, "empty conversation"),
    ("camelidae", {"instruction": "", "conversation": [{"input": "x"}]}, "missing key 'output'"),
    ("input_target", {"input": "x"}, "missing key 'target'"),
    ("input_target", {"input": "x", "target": 5}, "'target' must be a string"),
])
def test_malformed_rows_other_formats(tmp_path, tok, kind, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row_in(kind, TURNS[:1]), bad])
    with pytest.raises(PescError, match=rf"bad\.jsonl: row 2: .*{message}"):
        load(tok, path, kind)


def test_malformed_parquet_row_and_invalid_json(tmp_path, tok):
    rows = [row_in("sharegpt"), {"conversations": []}]
    Dataset.from_list(rows).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(PescError, match=r"bad\.parquet: row 2: empty conversation"):
        load(tok, tmp_path / "bad.parquet", "sharegpt")
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(PescError, match=r"broken\.jsonl: row 2: invalid JSON"):
        load(tok, path, "messages")


def test_entry_errors(tmp_path, tok):
    with pytest.raises(PescError, match=r"dataset file not found: .*nowhere\.jsonl"):
        load(tok, tmp_path / "nowhere.jsonl", "messages")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(PescError, match="unknown type 'openai'.*messages, sharegpt, alpaca, camelidae"):
        load(tok, path, "openai")
    with pytest.raises(PescError, match="unknown key.*feild, splt"):
        load_training_data([{"path": str(path), "type": "messages", "splt": "x", "feild": "y"}], tok,
                           chat_template="chatml", sequence_len=64)
    with pytest.raises(PescError, match="missing key 'type'"):
        load_training_data([{"path": str(path)}], tok, chat_template="chatml", sequence_len=64)


def test_padding_collator(tok):
    batch = make_collator(tok, sample_packing=False)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# --- packing: padding-free batches must give each sequence exactly what it gets alone -----------------------

# float32 on CPU: packed and single runs do the same arithmetic on different matrix shapes, so results differ
# only by accumulation order (~1e-6 relative); 1e-5 absolute on logits and per-token losses is far below the
# cross-contamination effect (>1e-2) that the attention_mask case shows.
TOL = 1e-5


@pytest.fixture(scope="module")
def packed_rows(tok, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "d.jsonl", [
        row_in("messages"), row_in("messages", TURNS[:1], None), row_in("messages", TURNS[1:], "Answer now.")])
    return list(load(tok, path, "messages"))


def per_token_losses(logits, labels):
    """Per-token cross-entropy with the causal shift (labels[t + 1] is predicted at t), 0 where ignored."""
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="none")


def check_packed_equals_alone(model, tok, rows):
    batch = make_collator(tok, sample_packing=True)(rows)
    assert "attention_mask" not in batch
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    assert starts == [0, len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]
    assert all(batch["labels"][0, s] == -100 for s in starts)
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        packed = out.logits
        alone = [model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits for r in rows]
        mixed = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=TOL, rtol=0)
    # the same per-token losses, and HF's loss is their mean over the trained tokens
    losses_packed = per_token_losses(packed, batch["labels"])
    losses_alone = torch.cat([
        torch.cat([per_token_losses(a, torch.tensor([r["labels"]])), torch.zeros(1)]) for a, r in zip(alone, rows)
    ])[:-1]
    torch.testing.assert_close(losses_packed, losses_alone, atol=TOL, rtol=0)
    n_trained = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    lm_loss = out.loss
    if getattr(out, "aux_loss", None) is not None:  # PESC adds coef * load-balancing loss to the LM loss
        lm_loss = lm_loss - model.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(lm_loss, losses_alone.sum() / n_trained, atol=TOL, rtol=0)
    # with an attention mask the later sequences attend to the earlier ones: the test can fail
    second = slice(starts[1], starts[2])
    assert (mixed[:, second] - packed[:, second]).abs().max() > 1e-2
    torch.testing.assert_close(mixed[:, : starts[1]], packed[:, : starts[1]], atol=TOL, rtol=0)


def test_packing_matches_unpacked_dense(tok, packed_rows):
    model = build_tiny_dense("llama", vocab_size=len(tok)).float().eval()
    check_packed_equals_alone(model, tok, packed_rows)


def test_packing_matches_unpacked_pesc(tok, packed_rows):
    model = upcycle(build_tiny_dense("llama", vocab_size=len(tok)), num_experts=4, adapter_dim=8).float().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        ups = [p for n, p in model.named_parameters() if "adapter_up" in n]
        assert ups
        for p in ups:  # adapter_up starts at zero: perturb it so the experts differ and matter
            p.normal_(0, 0.5)
    check_packed_equals_alone(model, tok, packed_rows)


def test_alpaca_column_mapping(tmp_path, tok):
    rows = [{"query": "What is 2 + 3?", "response": "2 + 3 = 5.", "sys": "Be brief.", "ctx": "Show your work."},
            {"query": "And 4 + 4?", "response": "8.", "sys": None, "ctx": ""}]
    path = write_jsonl(tmp_path / "meta.jsonl", rows)
    entry = {"path": str(path), "type": "alpaca", "instruction_field": "query", "output_field": "response",
             "input_field": "ctx", "system_field": "sys"}
    train, _ = load_training_data([entry], tok, chat_template="chatml", sequence_len=512)
    by_answer = {tok.decode(r["input_ids"]).split("assistant\n")[-1]: r for r in train}
    first, second = by_answer["2 + 3 = 5.<|im_end|>\n"], by_answer["8.<|im_end|>\n"]
    assert tok.decode(first["input_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n\nShow your work.<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    )
    assert tok.decode(second["input_ids"]) == (  # null system, empty input: neither is rendered
        "<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n8.<|im_end|>\n"
    )
    assert trainable_spans(tok, first["input_ids"], first["labels"]) == ["2 + 3 = 5.<|im_end|>"]
    assert trainable_spans(tok, second["input_ids"], second["labels"]) == ["8.<|im_end|>"]
    # Magicoder's layout (instruction/response) with the reference prompt
    code = write_jsonl(tmp_path / "code.jsonl", [{"instruction": "Reverse 'ab'.", "response": "'ba'"}])
    entry = {"path": str(code), "type": "alpaca", "instruction_field": "instruction", "output_field": "response"}
    (row,), _ = load_training_data([entry], tok, chat_template="camelidae", sequence_len=512)
    assert tok.decode(row["input_ids"]) == "<|endoftext|>### Human:\nReverse 'ab'.\n### Assistant:\n'ba'<|im_end|>"
    assert trainable_spans(tok, row["input_ids"], row["labels"]) == ["'ba'<|im_end|>"]


def test_conversation_column_mapping(tmp_path, tok):
    conv = [{"speaker": "human", "text": q} for q, _ in TURNS[:1]] + [{"speaker": "gpt", "text": TURNS[0][1]}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"dialog": conv}])
    entry = {"path": str(path), "type": "sharegpt", "field": "dialog", "role_field": "speaker", "content_field": "text"}
    (row,), _ = load_training_data([entry], tok, chat_template="chatml", sequence_len=512)
    assert trainable_spans(tok, row["input_ids"], row["labels"]) == [TURNS[0][1] + "<|im_end|>"]
    msgs = [{"who": "user", "says": "hi"}, {"who": "assistant", "says": "hello"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    entry = {"path": str(path), "type": "messages", "role_field": "who", "content_field": "says"}
    (row,), _ = load_training_data([entry], tok, chat_template="chatml", sequence_len=512)
    assert trainable_spans(tok, row["input_ids"], row["labels"]) == ["hello<|im_end|>"]
    write_jsonl(path, [{"messages": msgs}, {"messages": [{"who": "user"}]}])
    with pytest.raises(PescError, match=r"m\.jsonl: row 2: missing key 'says'"):
        load_training_data([entry], tok, chat_template="chatml", sequence_len=512)


@pytest.mark.parametrize("entry, row, message", [
    ({"instruction_field": "query", "output_field": "response"}, {"instruction": "x", "response": "y"},
     r"row 2: missing column 'query' \(set by instruction_field; the row has: instruction, response\)"),
    ({"output_field": "response"}, {"instruction": "x", "output": "y"}, r"row 2: missing column 'response'"),
    ({"input_field": "ctx"}, {"instruction": "x", "output": "y"}, r"row 2: missing column 'ctx' \(set by input_field"),
    ({"system_field": "sys"}, {"instruction": "x", "output": "y"}, r"row 2: missing column 'sys' \(set by system_field"),
    ({"output_field": "response"}, {"instruction": "x", "response": 3}, r"row 2: 'response' must be a string, got int"),
    ({"instruction_field": "query"}, {"query": None, "output": "y"}, r"row 2: missing key 'query'"),
])
def test_missing_mapped_column_names_file_row_column(tmp_path, tok, entry, row, message):
    good = {"instruction": "a", "query": "a", "output": "b", "response": "b", "ctx": "", "sys": ""}
    path = write_jsonl(tmp_path / "mapped.jsonl", [good, row])
    with pytest.raises(PescError, match=rf"mapped\.jsonl: {message}"):
        load_training_data([{"path": str(path), "type": "alpaca", **entry}], tok, chat_template="chatml",
                           sequence_len=64)


def test_missing_mapped_column_parquet(tmp_path, tok):
    Dataset.from_list([{"instruction": "x", "response": "y"}] * 2).to_parquet(tmp_path / "magic.parquet")
    entry = {"path": str(tmp_path / "magic.parquet"), "type": "alpaca", "instruction_field": "query",
             "output_field": "response"}
    with pytest.raises(PescError, match=r"magic\.parquet: row 1: missing column 'query' \(set by instruction_field"):
        load_training_data([entry], tok, chat_template="chatml", sequence_len=64)


@pytest.mark.parametrize("extra, message", [
    ({"instruction_feild": "q"}, r"datasets\[0\]: unknown key\(s\) instruction_feild \(valid keys: .*instruction_field"),
    ({"type": "sharegpt", "output_field": "r"}, "output_field does not apply to sharegpt rows"),
    ({"field": "chat"}, "field does not apply to alpaca rows"),
    ({"type": "camelidae", "role_field": "r", "content_field": "c"}, "role_field, content_field do not apply to camelidae"),
    ({"instruction_field": 3}, r"datasets\[0\]\.instruction_field must be a string, got int"),
    ({"output_field": ""}, r"datasets\[0\]\.output_field must name a column"),
])
def test_column_mapping_entry_errors(tmp_path, tok, extra, message):
    path = write_jsonl(tmp_path / "d.jsonl", [row_in("alpaca", TURNS[:1])])
    entry = {"path": str(path), "type": "alpaca", **extra}
    with pytest.raises(PescError, match=message):
        load_training_data([entry], tok, chat_template="chatml", sequence_len=64)
    with pytest.raises(PescError, match=message):  # the same check, without loading anything
        check_dataset_entry(0, entry)


def test_camelidae_recipe_datasets_validate():
    from pesc.training.config import load_config, validate

    config = load_config("camelidae-8x7b")  # the whole config check, no I/O beyond the file
    by_path = {entry["path"]: entry for entry in config["datasets"]}
    assert by_path["ise-uiuc/Magicoder-Evol-Instruct-110K"] == {
        "path": "ise-uiuc/Magicoder-Evol-Instruct-110K", "type": "alpaca",
        "instruction_field": "instruction", "output_field": "response"}
    assert by_path["meta-math/MetaMathQA"] == {
        "path": "meta-math/MetaMathQA", "type": "alpaca", "instruction_field": "query", "output_field": "response"}
    for i, entry in enumerate(config["datasets"]):
        check_dataset_entry(i, entry)
    raw = {**config, "datasets": [{**by_path["meta-math/MetaMathQA"], "instrucion_field": "query"}]}
    typo = r"unknown config key 'datasets\[0\]\.instrucion_field' \(did you mean 'instruction_field'\?\)"
    with pytest.raises(PescError, match=typo):
        validate(raw)
    raw = {**config, "datasets": [{"path": "Open-Orca/SlimOrca", "type": "sharegpt", "output_field": "response"}]}
    with pytest.raises(PescError, match=r"datasets\[0\]: output_field does not apply to sharegpt rows"):
        validate(raw)
