"""The data `pesc routes` runs: `--data [TASK=]FILE` files, read and tokenized exactly as training reads them.

Each file goes through pesc's training data pipeline (`pesc.data.load_training_data`: the file formats,
the chat template, truncation to sequence_len), so the routers see the tokens they saw in training:
the whole conversation, prompt and answer. An encoder-decoder (T5) reads them as its training does
(pesc.data.seq2seq): the encoder the source (the turns before the last answer), the decoder the answer, shifted
right by the model behind its start token, as training feeds it. Files given the same TASK are one task (one column of the
figures); a file without TASK= is a task of its own, named by the file's stem.
"""

from dataclasses import dataclass
from pathlib import Path

from datasets import concatenate_datasets

from pesc.errors import PescError


@dataclass
class TaskData:
    task: str
    files: list[str]
    rows: list[list[int]]  # token ids per row (an encoder-decoder's: the source), longest first (less padding)
    targets: list[list[int]] | None = None  # an encoder-decoder's answer ids per row; None for a decoder-only model


def parse_data_option(value: str) -> tuple[str, str]:
    """`FILE` or `TASK=FILE` -> (task, file). A file whose own name has '=' in it is taken as a file."""
    task, sep, path = value.partition("=")
    if not sep or Path(value).exists() or "/" in task:
        return Path(value).stem, value
    if not task or not path:
        raise PescError(f"--data {value!r}: give FILE or TASK=FILE, both non-empty")
    return task, path


def load_tasks(
    data: list[str], tokenizer, *, data_type: str, chat_template: str | None, sequence_len: int, limit: int | None,
    target_len: int | None = None,
) -> list[TaskData]:
    """The --data files tokenized, grouped by task in the order given; `limit`: a fixed sample of rows per file;
    `target_len` set: an encoder-decoder's (source, answer) rows, as training makes them."""
    from pesc.data import load_training_data
    from pesc.recipe import demo_data

    tasks: dict[str, TaskData] = {}
    parts: dict[str, list] = {}
    for value in data:
        task, path = parse_data_option(value)
        path = demo_data(path)
        if not Path(path).exists():
            raise PescError(f"data file not found: {path}")
        try:
            rows, _ = load_training_data([{"path": path, "type": data_type}], tokenizer, chat_template=chat_template,
                                         sequence_len=sequence_len, max_dropped_fraction=1.0,
                                         target_len=target_len)
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise PescError(f"cannot read {path} ({reason or error}): give a readable data file") from None
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        tasks.setdefault(task, TaskData(task, [], [])).files.append(path)
        parts.setdefault(task, []).append(rows)
    for task, rows in parts.items():
        rows = concatenate_datasets(rows) if len(rows) > 1 else rows[0]
        if target_len is None:
            tasks[task].rows = sorted(rows["input_ids"], key=len, reverse=True)
        else:
            pairs = sorted(zip(rows["input_ids"], rows["labels"]), key=lambda pair: len(pair[0]), reverse=True)
            tasks[task].rows, tasks[task].targets = [source for source, _ in pairs], [target for _, target in pairs]
    return list(tasks.values())


def batches(task: TaskData, batch_size: int, tokenizer):
    """Right-padded {input_ids, attention_mask} batches of the task's rows, padded as training pads (left out of every
    count); an encoder-decoder's with its answers as `labels` (padding -100), which the model shifts into its decoder
    input as in training."""
    from pesc.data import make_collator

    collate = make_collator(tokenizer, sample_packing=False, encoder_decoder=task.targets is not None)
    targets = task.rows if task.targets is None else task.targets
    for start in range(0, len(task.rows), batch_size):
        batch = collate([{"input_ids": ids, "labels": labels}
                         for ids, labels in zip(task.rows[start:start + batch_size], targets[start:start + batch_size])])
        if task.targets is None:
            del batch["labels"]
        yield batch
