"""Per-sample fields (a method's `task_type`) from the YAML entry or a column, through tokenizing and the
collators (padded and packed), to one value per token row in the model; and older runs' experts file."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from pesc.data import load_training_data, make_collator
from pesc.errors import PescError
from pesc.methods import SampleField
from pesc.modeling.moe_routing import per_token

TASK = SampleField("task_type", {"chat": 0, "code": 1})


def _write(path, task_types):
    rows = []
    for i, task in enumerate(task_types):
        row = {"messages": [{"role": "user", "content": f"q{i} " * (i + 1)}, {"role": "assistant", "content": f"a{i}"}]}
        if task is not None:
            row["task_type"] = task
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _load(tokenizer, entries):
    train, _ = load_training_data(entries, tokenizer, chat_template="chatml", sequence_len=64, sample_fields=(TASK,))
    return train


def test_the_row_column_wins_over_the_entry_value(tokenizer, tmp_path):
    data = _write(tmp_path / "d.jsonl", ["chat", None, "code", None])
    train = _load(tokenizer, [{"path": str(data), "type": "messages", "task_type": "code"}])
    by_length = sorted(zip((len(ids) for ids in train["input_ids"]), train["task_type"]))
    assert [task for _, task in by_length] == [0, 1, 1, 1]  # row 0 says chat, rows 1 and 3 take the entry's code


def test_a_row_without_a_required_field_is_named(tokenizer, tmp_path):
    data = _write(tmp_path / "d.jsonl", ["chat", None])
    with pytest.raises(PescError, match=r"d\.jsonl: row 2: missing task_type \(set task_type: in its datasets entry"):
        _load(tokenizer, [{"path": str(data), "type": "messages"}])
    with pytest.raises(PescError, match=r"datasets\[0\]\.task_type: task_type 'poetry' is not one of chat, code"):
        _load(tokenizer, [{"path": str(data), "type": "messages", "task_type": "poetry"}])


def test_padded_and_packed_batches_carry_one_value_per_sequence(tokenizer):
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_type": 1},
                {"input_ids": [8, 9], "labels": [-100, 9], "task_type": 0}]
    padded = make_collator(tokenizer, sample_packing=False, sample_fields=("task_type",))(features)
    assert padded["task_type"].tolist() == [1, 0] and padded["input_ids"].shape == (2, 3)
    packed = make_collator(tokenizer, sample_packing=True, sample_fields=("task_type",))(features)
    assert packed["task_type"].tolist() == [1, 0] and packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the model spreads them over the token rows of the flattened batch
    assert per_token(padded["task_type"], 6, padded["attention_mask"], None).tolist() == [1, 1, 1, 0, 0, 0]
    assert per_token(packed["task_type"], 5, None, packed["position_ids"]).tolist() == [1, 1, 1, 0, 0]


def test_a_run_written_before_the_method_interface_still_reads(trained_run, tmp_path):
    """Older runs call the experts file pesc_experts.safetensors: export, eval and resume find it."""
    from pesc.checkpoint.run_files import load_expert_state
    from pesc.checkpoint.trained_run import find_checkpoint
    from pesc.training.run import resume_checkpoint

    old = tmp_path / "old-run"
    shutil.copytree(trained_run, old)
    (old / "checkpoint-2" / "experts.safetensors").rename(old / "checkpoint-2" / "pesc_experts.safetensors")
    (old / "checkpoint-2" / "trainer_state.json").write_text("{}")
    checkpoint, _ = find_checkpoint(old)
    assert checkpoint == old / "checkpoint-2" and resume_checkpoint(old) == checkpoint
    new = load_expert_state(trained_run / "checkpoint-2")
    old_state = load_expert_state(checkpoint)
    assert old_state.keys() == new.keys() and all(torch.equal(old_state[k], new[k]) for k in new)
