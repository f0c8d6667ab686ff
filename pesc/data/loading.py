"""The data pipeline: dataset entries -> messages -> (input_ids, labels), mixed, shuffled, split.

A method's per-sample fields (LoRAMoE's `task_type`: pesc.methods.SampleField) ride along as integer
columns: a row's own column of that name, else the value its `datasets:` entry sets.

All user mistakes (a bad entry, a missing file, a malformed row, a template that cannot be masked) raise
PescError here, before any model is loaded or any training step runs.
"""

import functools
import json
import logging
from pathlib import Path

import datasets as hf_datasets
from datasets import Dataset, Features, List, Value, concatenate_datasets

from pesc.data.formats import COLUMN_KEYS, DATASET_TYPES, RowError, make_converter
from pesc.data.masking import IGNORE_INDEX, ConversationTokenizer
from pesc.data.seq2seq import Seq2SeqTokenizer
from pesc.data.templates import resolve_chat_template
from pesc.errors import PescError

logger = logging.getLogger(__name__)

_SOURCE_KEYS = ("path", "type", "split", "name", "data_files")
_COLUMN_KEYS = tuple(dict.fromkeys(key for keys in COLUMN_KEYS.values() for key in keys))
DATASET_KEYS = _SOURCE_KEYS + _COLUMN_KEYS
"""Every key a dataset entry may have: where the data is, its format, and (per format) its column names."""
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_MESSAGES = Features({"messages": List({"role": Value("string"), "content": Value("string")})})


def check_dataset_entry(index: int, entry, sample_fields=()) -> dict:
    """One `datasets:` entry's keys and types (no I/O); returns it. Raises PescError naming `datasets[index]`.

    Besides DATASET_KEYS, an entry may set the value of each of the method's `sample_fields` for all its rows."""
    where = f"datasets[{index}]"
    if not isinstance(entry, dict):
        raise PescError(f"{where} must be a mapping with at least 'path' and 'type', got {type(entry).__name__}")
    known = (*DATASET_KEYS, *(field.name for field in sample_fields))
    unknown = sorted(map(str, set(entry) - set(known)))
    if unknown:
        raise PescError(f"{where}: unknown key(s) {', '.join(unknown)} (valid keys: {', '.join(known)})")
    for field in sample_fields:
        if entry.get(field.name) is not None:
            field.encode(entry[field.name], f"{where}.{field.name}")
    for key in ("path", "type"):
        if key not in entry:
            raise PescError(f"{where}: missing key '{key}'")
    for key in ("path", "type", "split", "name", *_COLUMN_KEYS):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            raise PescError(f"{where}.{key} must be a string, got {type(entry[key]).__name__}")
    for key in _COLUMN_KEYS:
        if entry.get(key) == "":
            raise PescError(f"{where}.{key} must name a column, got an empty string")
    if entry.get("data_files") is not None and not isinstance(entry["data_files"], (str, list, dict)):
        raise PescError(f"{where}.data_files must be a string, a list or a mapping")
    kind = entry["type"]
    if kind not in DATASET_TYPES:
        raise PescError(f"{where}: unknown type {kind!r} (valid types: {', '.join(DATASET_TYPES)})")
    foreign = [key for key in _COLUMN_KEYS if entry.get(key) is not None and key not in COLUMN_KEYS[kind]]
    if foreign:
        raise PescError(
            f"{where}: {', '.join(foreign)} do{'es' if len(foreign) == 1 else ''} not apply to {kind} rows "
            f"({kind} takes {', '.join(COLUMN_KEYS[kind])})"
        )
    return entry


def _columns(entry: dict) -> dict[str, str]:
    """The entry's column mapping: the column keys it sets (to a name)."""
    return {key: entry[key] for key in COLUMN_KEYS[entry["type"]] if entry.get(key) is not None}


def _is_local(path: str) -> bool:
    return path.endswith(_LOCAL_SUFFIXES) or path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def _json_rows(path: Path):
    """(1-based row number, parsed row) for a JSON-lines file or a JSON array file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": JSON lines in a .json file, read below
                raise PescError(f"{path}: invalid JSON: {exc}") from exc
        else:
            if not isinstance(data, list):
                raise PescError(f"{path}: a .json file must hold a JSON array of rows (or use JSON lines)")
            yield from enumerate(data, start=1)
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise PescError(f"{path}: row {number}: invalid JSON: {exc}") from exc


def _convert(where: str, number: int, row, convert) -> list[dict]:
    try:
        return convert(row)
    except RowError as exc:
        raise PescError(f"{where}: row {number}: {exc}") from None


def _sample_values(entry: dict, sample_fields, path: str, number: int, row) -> dict[str, int]:
    """The row's per-sample fields as integers: its own column, else its entry's value (-1: none, if optional)."""
    values = {}
    for field in sample_fields:
        value = row.get(field.name) if isinstance(row, dict) else None
        if value is None:
            value = entry.get(field.name)
        if value is None:
            if field.required:
                raise PescError(
                    f"{path}: row {number}: missing {field.name} (set {field.name}: in its datasets entry, or give "
                    f"each row a {field.name} column)"
                )
            values[field.name] = -1
        else:
            values[field.name] = field.encode(value, f"{path}: row {number}")
    return values


def _load_messages(entry: dict, sample_fields=()) -> tuple[Dataset, str]:
    """One dataset entry as a Dataset with a `messages` column (validated, converted) and one integer column
    per sample field."""
    from pesc.recipe import demo_data

    path = demo_data(entry["path"])  # pesc:NAME: the demo data shipped in the package
    convert = make_converter(entry["type"], _columns(entry))
    features = Features({**_MESSAGES, **{field.name: Value("int64") for field in sample_fields}})
    hub_kwargs = {k: entry[k] for k in ("name", "data_files") if entry.get(k) is not None}
    if _is_local(path):
        file = Path(path).expanduser()
        if not file.exists():
            raise PescError(f"dataset file not found: {path}")
        if not file.is_file() and not file.is_dir():  # else datasets takes it for a Hub id and fails as one
            raise PescError(f"{path} is not a regular file or a folder (a pipe, socket or device): give a .jsonl, "
                            ".json or .parquet file, or a folder of them")
        if file.is_file():
            if entry.get("split") not in (None, "train") or hub_kwargs:
                raise PescError(f"{path}: split/name/data_files apply to Hub datasets and folders, not to one file")
            if file.suffix in (".jsonl", ".json"):
                rows = [
                    {"messages": _convert(path, n, row, convert), **_sample_values(entry, sample_fields, path, n, row)}
                    for n, row in _json_rows(file)
                ]
                if not rows:
                    raise PescError(f"{path}: the file has no rows")
                return Dataset.from_list(rows, features=features), path
            if file.suffix != ".parquet":
                raise PescError(f"{path}: unsupported file type {file.suffix!r} (use .jsonl, .json or .parquet)")
            loader_args, kwargs = ("parquet",), {"data_files": str(file)}
        else:  # a folder of data files, as datasets reads it
            loader_args, kwargs = (str(file),), hub_kwargs
    else:
        loader_args, kwargs = (path,), hub_kwargs
    split = entry.get("split") or "train"
    try:
        raw = hf_datasets.load_dataset(*loader_args, split=split, **kwargs)
    except Exception as exc:
        local = "" if _is_local(path) else "it is not a local file or folder, and "
        raise PescError(
            f"cannot load dataset {path!r} (split {split!r}): {local}{type(exc).__name__}: {exc}"
        ) from exc

    def convert_batch(batch, indices):
        columns = list(batch)
        rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        out = {"messages": [_convert(path, i + 1, row, convert) for i, row in zip(indices, rows)]}
        for field in sample_fields:
            out[field.name] = [
                _sample_values(entry, (field,), path, i + 1, row)[field.name] for i, row in zip(indices, rows)
            ]
        return out

    ds = raw.map(
        convert_batch, batched=True, with_indices=True, remove_columns=raw.column_names, features=features,
        desc=f"Converting {path}",
    )
    if len(ds) == 0:
        raise PescError(f"{path}: the dataset has no rows")
    return ds, path


def _tokenize(ds: Dataset, name: str, tokenize, num_proc) -> Dataset:
    """The rows tokenized and truncated by `tokenize` (conversations -> input_ids, labels); rows left with no
    trainable token are dropped (see `_check_dropped`)."""
    def tokenize_batch(batch, indices):
        try:
            ids, labels = tokenize(batch["messages"])
        except RowError:
            for i, messages in zip(indices, batch["messages"]):  # find the row to name it
                try:
                    tokenize([messages])
                except RowError as exc:
                    raise PescError(f"{name}: row {i + 1}: {exc}") from None
            raise
        trainable = [sum(label != IGNORE_INDEX for label in row) for row in labels]
        return {"input_ids": ids, "labels": labels, "_trainable": trainable}

    procs = num_proc if num_proc and num_proc > 1 and len(ds) >= 2 * num_proc else None
    out = ds.map(
        tokenize_batch, batched=True, with_indices=True, remove_columns=["messages"], num_proc=procs,
        desc=f"Tokenizing {name}",
    )
    kept = out.filter(lambda n: [x > 0 for x in n], input_columns="_trainable", batched=True)
    return kept.remove_columns("_trainable")


def _check_dropped(counts: list[tuple[str, int, int]], sequence_len: int, max_dropped_fraction: float) -> None:
    """Report the rows truncation dropped, per dataset (name, rows, rows kept); refuse more than the allowed share."""
    total = sum(rows for _, rows, _ in counts)
    dropped = total - sum(kept for _, _, kept in counts)
    if not dropped:
        return
    per_dataset = "; ".join(f"{name}: {rows - kept} of {rows}" for name, rows, kept in counts if kept < rows)
    what = (f"sequence_len={sequence_len} drops {dropped} of {total} rows ({dropped / total:.0%}; {per_dataset}) "
            "whose prompt alone fills it, leaving no answer token")
    if dropped == total:
        raise PescError(f"no training rows left: {what}: raise sequence_len")
    if dropped > max_dropped_fraction * total:
        raise PescError(f"{what}, more than max_dropped_fraction={max_dropped_fraction:g}: raise sequence_len, "
                        "or max_dropped_fraction (1 allows any)")
    logger.warning("%s; raise sequence_len to keep them", what)


def _val_rows(val_set_size, total: int) -> int:
    """val_set_size as a row count: 0 for none, a fraction in (0, 1) of `total`, or a positive integer."""
    bad = PescError(f"val_set_size must be 0, a fraction in (0, 1) or a whole row count, got {val_set_size!r}")
    if isinstance(val_set_size, bool) or not isinstance(val_set_size, (int, float)) or val_set_size < 0:
        raise bad
    if val_set_size == 0:
        return 0
    if isinstance(val_set_size, float):
        if val_set_size >= 1:
            raise bad
        rows = max(1, round(val_set_size * total))
    else:
        rows = val_set_size
    if rows >= total:
        raise PescError(f"val_set_size={val_set_size} leaves no training rows ({total} rows in all)")
    return rows


def load_training_data(
    datasets: list[dict],  # noqa: A002 (the config key's name)
    tokenizer,
    *,
    chat_template: str | None,
    sequence_len: int,
    val_set_size: float | int = 0.0,
    seed: int = 0,
    num_proc: int | None = None,
    max_dropped_fraction: float = 0.1,
    sample_fields=(),
    target_len: int | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Load, convert, tokenize, mask; returns (train, eval) with columns input_ids, labels (lists of int) and
    one integer column per sample field of the method (pesc.methods.SampleField).

    Each entry of `datasets`: path (local .jsonl/.json/.parquet file or folder, relative to the working folder;
    `pesc:NAME`, demo data shipped with pesc; or a Hub dataset id), type
    (messages, sharegpt, alpaca, camelidae, input_target), optional split (Hub/folder, default train), name, data_files,
    and the type's column names (`field`: the conversation; `role_field`/`content_field`: the keys of a
    messages/sharegpt turn; `instruction_field`/`input_field`/`output_field`/`system_field`: alpaca's
    columns; `input_field`/`target_field`: input_target's). Rows are truncated to `sequence_len` tokens; rows left
    with no trainable token are dropped, reported at the end (a warning), and refused when more than
    `max_dropped_fraction` of all rows. All
    datasets are mixed and shuffled with `seed`; `val_set_size` (a fraction in (0, 1) or a row count; 0 for
    none) rows go to the eval set.

    `target_len` set: encoder-decoder examples (pesc.data.seq2seq): input_ids are the source, cut to `sequence_len`,
    labels the last answer, cut to `target_len`; a template is used only where `chat_template` is set.
    """
    if not isinstance(datasets, list) or not datasets:
        raise PescError("datasets must be a non-empty list of {path, type, ...} entries")
    if isinstance(sequence_len, bool) or not isinstance(sequence_len, int) or sequence_len < 2:
        raise PescError(f"sequence_len must be an integer >= 2, got {sequence_len!r}")
    entries = [check_dataset_entry(i, entry, sample_fields) for i, entry in enumerate(datasets)]
    if target_len is None:
        tokenize = functools.partial(ConversationTokenizer(tokenizer, resolve_chat_template(tokenizer, chat_template)),
                                     sequence_len=sequence_len)
    else:
        template = None if chat_template is None else resolve_chat_template(tokenizer, chat_template)
        tokenize = functools.partial(Seq2SeqTokenizer(tokenizer, template), source_len=sequence_len,
                                     target_len=target_len)

    parts, counts = [], []
    for entry in entries:
        messages, name = _load_messages(entry, sample_fields)
        parts.append(_tokenize(messages, name, tokenize, num_proc))
        counts.append((name, len(messages), len(parts[-1])))
        logger.info("%s: %d rows (%s format)", name, len(parts[-1]), entry["type"])
    _check_dropped(counts, sequence_len, max_dropped_fraction)
    mixed = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    mixed = mixed.shuffle(seed=seed).flatten_indices()

    n_val = _val_rows(val_set_size, len(mixed))
    if n_val == 0:
        return mixed, None
    split = mixed.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return split["train"], split["test"]

