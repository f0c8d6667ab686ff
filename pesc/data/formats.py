"""Convert one row of a supported dataset format into a list of {"role", "content"} messages.

Every converter raises `RowError` (a plain message); the loader adds the file and row number.
"""

from collections.abc import Callable

ROLES = ("system", "user", "assistant")

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class RowError(ValueError):
    """What is wrong with one row (no location: the loader knows the file and row number)."""


def _get(row: dict, key: str, kind: type | tuple[type, ...], what: str, *, required: bool = True):
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing key '{key}'")
        return None
    value = row[key]
    if not isinstance(value, kind):
        raise RowError(f"{what} must be a {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    names = {str: "string", list: "list", dict: "object"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _check_row(row) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    return row


def _turns(row: dict, field: str) -> list:
    turns = _get(row, field, list, f"'{field}'")
    if not turns:
        raise RowError(f"empty conversation ('{field}' is an empty list)")
    return turns


def _finish(messages: list[dict]) -> list[dict]:
    """Check the turn order and drop trailing non-assistant turns (nothing after them is trained)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RowError("no assistant turn: there is nothing to train on")
    return messages[: last + 1]


def _conversation(row, field: str, role_field: str, content_field: str, roles: dict) -> list[dict]:
    """Turns [{role_field: speaker, content_field: text}, ...] in column `field`, speakers mapped by `roles`."""
    row = _check_row(row)
    messages = []
    for i, turn in enumerate(_turns(row, field), start=1):
        if not isinstance(turn, dict):
            raise RowError(
                f"'{field}'[{i}] must be an object with '{role_field}' and '{content_field}', got {type(turn).__name__}"
            )
        speaker = _get(turn, role_field, str, f"'{field}'[{i}].{role_field}")
        if speaker not in roles:
            raise RowError(f"'{field}'[{i}] has unknown role {speaker!r} (valid: {', '.join(roles)})")
        content = _get(turn, content_field, str, f"'{field}'[{i}].{content_field}")
        messages.append({"role": roles[speaker], "content": content})
    return _finish(messages)


def convert_messages(
    row, field: str = "messages", role_field: str = "role", content_field: str = "content"
) -> list[dict]:
    """OpenAI chat format: {"messages": [{"role": "user", "content": "..."}, ...]}."""
    return _conversation(row, field, role_field, content_field, {role: role for role in ROLES})


def convert_sharegpt(
    row, field: str = "conversations", role_field: str = "from", content_field: str = "value"
) -> list[dict]:
    """ShareGPT: {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}."""
    return _conversation(row, field, role_field, content_field, _SHAREGPT_ROLES)


def convert_alpaca(
    row,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    system_field: str | None = None,
) -> list[dict]:
    """Alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}; optional system column."""
    row = _check_row(row)
    system = _get(row, system_field, str, f"'{system_field}'", required=False) if system_field else None
    instruction = _get(row, instruction_field, str, f"'{instruction_field}'")
    extra = _get(row, input_field, str, f"'{input_field}'", required=False)
    output = _get(row, output_field, str, f"'{output_field}'")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def convert_input_target(row, input_field: str = "input", target_field: str = "target") -> list[dict]:
    """Prompt -> target pairs, P3 / T0 style: {"input": "...", "target": "..."} (one user turn, one answer)."""
    row = _check_row(row)
    prompt = _get(row, input_field, str, f"'{input_field}'")
    target = _get(row, target_field, str, f"'{target_field}'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": target}]


def convert_camelidae(row, field: str = "conversation") -> list[dict]:
    """Camelidae/IDAE: {"instruction": system prompt ("" for none), "conversation": [{"input", "output"}, ...]}."""
    row = _check_row(row)
    corpus = row.get("corpus")
    if corpus:
        raise RowError("non-empty 'corpus' (pre-training rows) is not supported; use instruction + conversation")
    system = _get(row, "instruction", str, "'instruction'", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(_turns(row, field), start=1):
        if not isinstance(turn, dict):
            raise RowError(f"'{field}'[{i}] must be an object with 'input' and 'output', got {type(turn).__name__}")
        messages.append({"role": "user", "content": _get(turn, "input", str, f"'{field}'[{i}].input")})
        messages.append({"role": "assistant", "content": _get(turn, "output", str, f"'{field}'[{i}].output")})
    return _finish(messages)


CONVERTERS: dict[str, Callable[..., list[dict]]] = {
    "messages": convert_messages,
    "sharegpt": convert_sharegpt,
    "alpaca": convert_alpaca,
    "camelidae": convert_camelidae,
    "input_target": convert_input_target,
}

DATASET_TYPES = tuple(CONVERTERS)

# The column-mapping keys a dataset entry may set, per type, with their defaults (None: not read by default).
# Keys naming a row's column are checked on every row when set; role_field/content_field name keys in each turn.
COLUMN_KEYS: dict[str, dict[str, str | None]] = {
    "messages": {"field": "messages", "role_field": "role", "content_field": "content"},
    "sharegpt": {"field": "conversations", "role_field": "from", "content_field": "value"},
    "alpaca": {
        "instruction_field": "instruction", "input_field": "input", "output_field": "output", "system_field": None,
    },
    "camelidae": {"field": "conversation"},
    "input_target": {"input_field": "input", "target_field": "target"},
}
_TURN_KEYS = ("role_field", "content_field")


def make_converter(kind: str, columns: dict[str, str] | None = None) -> Callable[[object], list[dict]]:
    """row -> messages for `kind`, with `columns` (a subset of COLUMN_KEYS[kind]) overriding the default names.

    A column named in `columns` must be in every row (an optional one, input or system, may be null or empty):
    a typo in the mapping is an error on the first row rather than an input silently left out. A row whose
    answers are all empty is an error too (nothing to learn but when to stop).
    """
    convert = CONVERTERS[kind]
    columns = dict(columns or {})
    required = {key: name for key, name in columns.items() if key not in _TURN_KEYS}

    def convert_row(row) -> list[dict]:
        row = _check_row(row)
        for key, name in required.items():
            if name not in row:
                have = ", ".join(map(str, list(row)[:12])) + (", ..." if len(row) > 12 else "")
                raise RowError(f"missing column '{name}' (set by {key}; the row has: {have or 'no keys'})")
        return _check_answers(convert(row, **columns))

    return convert_row


def _check_answers(messages: list[dict]) -> list[dict]:
    """Refuse a row whose every assistant answer is blank: it would train only on the end-of-turn token."""
    if all(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise RowError("every assistant answer is empty, so only the end-of-turn token would train: "
                       "fill the answer in or remove the row")
    return messages
