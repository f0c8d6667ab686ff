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


def convert_messages(row, field: str = "messages") -> list[dict]:
    """OpenAI chat format: {"messages": [{"role": "user", "content": "..."}, ...]}."""
    row = _check_row(row)
    messages = []
    for i, turn in enumerate(_turns(row, field), start=1):
        if not isinstance(turn, dict):
            raise RowError(f"'{field}'[{i}] must be an object with 'role' and 'content', got {type(turn).__name__}")
        role = _get(turn, "role", str, f"'{field}'[{i}].role")
        if role not in ROLES:
            raise RowError(f"'{field}'[{i}] has unknown role {role!r} (valid: {', '.join(ROLES)})")
        content = _get(turn, "content", str, f"'{field}'[{i}].content")
        messages.append({"role": role, "content": content})
    return _finish(messages)


def convert_sharegpt(row, field: str = "conversations") -> list[dict]:
    """ShareGPT: {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}."""
    row = _check_row(row)
    messages = []
    for i, turn in enumerate(_turns(row, field), start=1):
        if not isinstance(turn, dict):
            raise RowError(f"'{field}'[{i}] must be an object with 'from' and 'value', got {type(turn).__name__}")
        speaker = _get(turn, "from", str, f"'{field}'[{i}].from")
        if speaker not in _SHAREGPT_ROLES:
            raise RowError(
                f"'{field}'[{i}] has unknown role {speaker!r} (valid: {', '.join(_SHAREGPT_ROLES)})"
            )
        value = _get(turn, "value", str, f"'{field}'[{i}].value")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    return _finish(messages)


def convert_alpaca(row, field: str | None = None) -> list[dict]:
    """Alpaca: {"instruction": "...", "input": "..." (optional), "output": "..."}."""
    row = _check_row(row)
    instruction = _get(row, "instruction", str, "'instruction'")
    extra = _get(row, "input", str, "'input'", required=False)
    output = _get(row, "output", str, "'output'")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


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
}

DATASET_TYPES = tuple(CONVERTERS)
