"""Whether every task's data can be read here, checked before any weight loads.

Building an lm-eval task loads (downloads) its dataset, so the check reads the tasks' configs unbuilt from
lm-eval's index and asks `datasets` itself (`load_dataset_builder`, which finds files and cache entries but
reads no data) with the arguments lm-eval will pass to `load_dataset`.
"""

import inspect
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from functools import lru_cache

from pesc.errors import PescError, first_line

HUB_TIMEOUT_S = 5  # one request, no retries: a machine without network knows in 5 s, not after retries
LOCAL_TASK_HINT = ("to evaluate your own data offline, write a local task (a YAML config and a JSONL file) and "
                   "pass its folder with --include-path: docs/eval.md, \"A local task\"")


def _group_fields() -> set[str]:
    from lm_eval.config.group import GroupConfig

    return {field.name for field in fields(GroupConfig)}


def _leaf_configs(index: dict, name: str, overrides: dict) -> Iterator[tuple[str, dict]]:
    """(task, config) of every task a task, group or tag name runs, merged as lm-eval's TaskFactory merges
    them: a group's settings over its members' own configs, an enclosing group's over an inner one's."""
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind is Kind.TAG:
        for task in sorted(entry.tags):
            if task in index:  # lm-eval skips a tag's unknown names too
                yield from _leaf_configs(index, task, overrides)
    elif entry.kind is Kind.GROUP:
        yield from _group_members(index, entry.cfg, overrides)
    else:
        yield name, {**entry.cfg, **overrides}


def _group_members(index: dict, group: dict, overrides: dict) -> Iterator[tuple[str, dict]]:
    group_fields = _group_fields()
    overrides = {**{k: v for k, v in group.items() if k not in group_fields}, **overrides}
    members = group.get("task")
    for item in members if isinstance(members, list) else []:
        if isinstance(item, str):
            member, member_overrides = item, overrides
        elif "group" in item:
            if item["group"] in index:
                inline = {k: v for k, v in item.items() if k != "group"}
                yield from _leaf_configs(index, item["group"], {**overrides, **inline})
            else:  # a group defined inside this one
                yield from _group_members(index, item, overrides)
            continue
        elif "task" in item:
            member, member_overrides = item["task"], {**overrides, **item}
        else:
            raise PescError(f"group {group.get('group')}: an entry of its task list has neither 'task' nor "
                            f"'group' (its keys: {', '.join(item)}), which lm-eval refuses")
        if member in index:
            yield from _leaf_configs(index, member, member_overrides)
        else:  # a task defined inside the group
            yield member, member_overrides


def _data_source(config: dict) -> tuple[str, str | None, dict] | None:
    """(path, name, kwargs) of the `load_dataset` call lm-eval makes for a task; None where the task's own
    code makes its data (custom_dataset, a task class), which no config tells."""
    from datasets import load_dataset, load_dataset_builder

    path = config.get("dataset_path")
    if not path or config.get("custom_dataset") or config.get("class"):
        return None
    kwargs = dict(config.get("dataset_kwargs") or {})
    builder_parameters = inspect.signature(load_dataset_builder).parameters
    if "trust_remote_code" not in builder_parameters:
        kwargs.pop("trust_remote_code", None)  # as lm-eval drops it for datasets >= 4
    load_only = set(inspect.signature(load_dataset).parameters) - set(builder_parameters)  # split, streaming, ...
    return path, config.get("dataset_name"), {k: v for k, v in kwargs.items() if k not in load_only}


def _data_files(kwargs: dict) -> list[str]:
    files = kwargs.get("data_files") or []
    values = files.values() if isinstance(files, dict) else [files]
    return [str(f) for value in values for f in ([value] if isinstance(value, str) else value)]


def _is_local(path: str, kwargs: dict) -> bool:
    """The data is files on this machine: a packaged builder (json, csv, ...) over local data_files, or a folder."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    local_builder = path in _PACKAGED_DATASETS_MODULES or os.path.isdir(path)
    return local_builder and not any("://" in f for f in _data_files(kwargs))


@lru_cache(maxsize=4)
def hub_answers(endpoint: str) -> bool:
    """The Hub answers one HEAD request within HUB_TIMEOUT_S (any HTTP status counts as an answer)."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except OSError:  # URLError, a timeout, a refused connection
        return False
    return True


@contextmanager
def _cache_only():
    """`datasets` (and the Hub client under it) in offline mode, its cache notices silenced: files and cache
    entries are found, nothing is downloaded, and an unreachable Hub costs no retries."""
    import datasets
    from huggingface_hub import constants

    datasets_offline, hub_offline = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    datasets_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = datasets_offline, hub_offline
        datasets_logger.setLevel(level)


def _builder_error(path: str, name: str | None, kwargs: dict) -> Exception | None:
    """What `datasets` raises for this data from local files and its cache alone; None when it finds it."""
    from datasets import load_dataset_builder

    try:
        with _cache_only():
            load_dataset_builder(path, name, **kwargs)
    except (OSError, ValueError) as error:  # missing files, not cached, a config not cached
        return error
    return None


def _why_no_hub() -> str | None:
    """Why the Hub cannot be used now (offline mode, no answer); None when it can."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return "offline mode is on (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE)"
    endpoint = datasets.config.HF_ENDPOINT
    return None if hub_answers(endpoint) else f"the Hub ({endpoint}) did not answer within {HUB_TIMEOUT_S} s"


def _unreachable(task: str, config: dict) -> str | None:
    """Why the task's data cannot be read here, or None."""
    import datasets

    source = _data_source(config)
    if source is None:
        return None
    path, name, kwargs = source
    data = (f"{path} ({name})" if name else path) + (f" {kwargs['data_files']}" if kwargs.get("data_files") else "")
    if _is_local(path, kwargs):
        error = _builder_error(path, name, kwargs)
        if error is None:
            return None
        return (f"task {task} cannot read its data, {data}: {first_line(error)} (relative paths are read "
                f"from the folder pesc eval runs in)")
    why = _why_no_hub()
    if why is None or _builder_error(path, name, kwargs) is None:
        return None  # lm-eval downloads it, or finds it in the cache
    return (f"task {task} needs the dataset {data}, which is not in the local datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}) and {why}")


def leaf_configs(manager, name: str) -> Iterator[tuple[str, dict]]:
    """(task, config) of every task that a task, group or tag name in lm-eval's index (`manager`, a
    TaskManager) runs, without building any."""
    return _leaf_configs(manager.task_index, name, {})


def check_task_data(manager, names: list[str]) -> None:
    """Every task, group or tag name in lm-eval's index (`manager`) can read its data here: else one line
    naming the first unreachable one, the others listed after it."""
    problems = {}
    for name in names:
        for leaf, config in leaf_configs(manager, name):
            reason = _unreachable(name if leaf == name else f"{name} (its task {leaf})", config)
            if reason is not None:
                problems[name] = reason
                break
    if problems:
        first, *others = problems
        also = f"; also unreachable: {', '.join(others)}" if others else ""
        raise PescError(f"{problems[first]}{also}; {LOCAL_TASK_HINT}")
