"""`pesc routes` end to end: check the inputs, tokenize the data, load the model, tally the routing, write OUT.

Everything a user can get wrong (MODEL, the data files and their rows, OUT, the options) fails before the
model's weights load, and OUT appears only complete (`atomic_output_dir`).
"""

import re
from pathlib import Path

from pesc import __version__
from pesc.atomic import atomic_output_dir, check_output_dir
from pesc.errors import PescError
from pesc.routing_analysis import figures
from pesc.routing_analysis.inputs import batches, load_tasks
from pesc.routing_analysis.records import reads_encoder_tokens, routing_records, site_part
from pesc.routing_analysis.report import max_load_ratio, write_numbers
from pesc.routing_analysis.tally import RoutingTally, check_expert_range, group_shares

_GROUP = re.compile(r"^([^=\s]+)=(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


def parse_expert_groups(values: list[str]) -> dict[str, list[int]]:
    """`NAME=0,1,4-7` options -> {NAME: [0, 1, 4, 5, 6, 7]} (ranges inclusive)."""
    groups = {}
    for value in values:
        match = _GROUP.match(value.replace(" ", ""))
        if not match:
            raise PescError(f"--expert-group {value!r}: write NAME=INDICES, e.g. knowledge=0,1,2 or task=3-5")
        name, spec = match.groups()
        if name in groups:
            raise PescError(f"--expert-group {name!r} is given twice: list all its experts in one option")
        experts = []
        for part in spec.split(","):
            first, _, last = part.partition("-")
            if int(last or first) < int(first):
                raise PescError(f"--expert-group {value!r}: the range {part} is empty; write it low-high")
            experts += list(range(int(first), int(last or first) + 1))
        for other, taken in groups.items():
            both = sorted(set(experts) & set(taken))
            if both:
                raise PescError(f"expert {both[0]} is in both groups {other!r} and {name!r}: "
                                "give each expert to one group")
        groups[name] = experts
    return groups


def _training_settings(model: str) -> tuple[str | None, int, int | None]:
    """The chat_template, sequence_len and target_len MODEL was trained with (a run), else the training defaults."""
    from pesc.checkpoint.run_files import TRAIN_CONFIG_FILE
    from pesc.checkpoint.trained_run import find_checkpoint
    from pesc.evaluation.loading import source_kind
    from pesc.training.config import SCHEMA, load_config

    defaults = (SCHEMA["chat_template"].default, SCHEMA["sequence_len"].default, SCHEMA["target_len"].default)
    if source_kind(model) == "folder":
        return defaults
    _, run_dir = find_checkpoint(model)
    if run_dir is None:
        return defaults
    config = load_config(run_dir / TRAIN_CONFIG_FILE)
    return config["chat_template"], config["sequence_len"], config["target_len"]


def _is_encoder_decoder(model: str) -> bool:
    """Whether MODEL (a folder, or a run: its base) is an encoder-decoder (T5), read from its config alone."""
    from pesc.checkpoint.config import read_config
    from pesc.checkpoint.trained_run import adapter_base, find_checkpoint
    from pesc.evaluation.loading import source_kind

    if source_kind(model) == "folder":
        from pesc.generate import is_encoder_decoder

        return is_encoder_decoder(model)
    return bool(getattr(read_config(adapter_base(find_checkpoint(model)[0])), "is_encoder_decoder", False))


def _tally(model, tasks, batch_size: int, tokenizer) -> RoutingTally:
    from tqdm.auto import tqdm

    tally = RoutingTally()
    device = next(model.parameters()).device
    total = sum(-(-len(task.rows) // batch_size) for task in tasks)
    with tqdm(total=total, desc="pesc routes", unit="batch") as bar:
        for task in tasks:
            bar.set_postfix_str(task.task)
            for batch in batches(task, batch_size, tokenizer):
                tally.add(task.task, routing_records(model, {k: v.to(device) for k, v in batch.items()}))
                bar.update()
    return tally


def _write(out: Path, stats, shares, expert_groups, description) -> None:
    write_numbers(out, stats, shares, expert_groups, description)
    vmax = max(value for s in stats.values() for load in s.load.values() for row in load for value in row)
    (out / "balance").mkdir()
    for site, site_stats in stats.items():
        figures.plot_heatmap(site, site_stats, vmax, out / f"heatmap_{site}.png")
        figures.plot_balance(site, site_stats, out / f"balance_{site}.png")
        width = len(str(max(site_stats.layers)))
        for index, layer in enumerate(site_stats.layers):
            figures.plot_layer_balance(site, site_stats, index, out / "balance" / f"{site}_layer{layer:0{width}d}.png")
    figures.plot_entropy(stats, out / "entropy.png")
    if expert_groups:
        figures.plot_group_shares(shares, out / "expert_groups.png")


def run_routes(
    model: str,
    data: list[str],
    out: str | Path,
    *,
    data_type: str = "messages",
    chat_template: str | None = None,
    sequence_len: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    expert_group: list[str] = (),
    dtype: str = "float32",
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    echo=print,
) -> Path:
    """Run the --data files through MODEL and write the routing numbers and figures into OUT (which must not exist)."""
    from pesc.evaluation.loading import check_eval_source, load_eval_model, load_source_tokenizer

    for value, flag in ((limit, "--limit"), (batch_size, "--batch-size"), (sequence_len, "--sequence-len")):
        if value is not None and value < 1:
            raise PescError(f"{flag} must be >= 1, got {value}")
    if not data:
        raise PescError("give at least one --data FILE")
    expert_groups = parse_expert_groups(list(expert_group))
    out = Path(out)
    check_output_dir(out, False, (model,), has_force=False)
    check_eval_source(model, trust_remote_code)
    trained_template, trained_len, trained_target_len = _training_settings(model)
    chat_template = trained_template if chat_template is None else chat_template
    sequence_len = trained_len if sequence_len is None else sequence_len
    # an encoder-decoder's answers are cut as its training cut them (target_len, by default sequence_len)
    target_len = (trained_target_len or sequence_len) if _is_encoder_decoder(model) else None

    tokenizer = load_source_tokenizer(model, trust_remote_code)
    tasks = load_tasks(data, tokenizer, data_type=data_type, chat_template=chat_template, sequence_len=sequence_len,
                       limit=limit, target_len=target_len)
    eval_model = load_eval_model(model, dtype=dtype, load_in_4bit=load_in_4bit, tokenizer=tokenizer,
                                 trust_remote_code=trust_remote_code)
    stats = _tally(eval_model.model, tasks, batch_size, tokenizer).stats()
    for site, site_stats in stats.items():
        check_expert_range(expert_groups, site_stats.num_experts, site)
    shares = {site: group_shares(s, expert_groups) for site, s in stats.items()} if expert_groups else None
    description = {
        **eval_model.description, "pesc_version": __version__, "data_type": data_type,
        "tasks": {task.task: task.files for task in tasks}, "chat_template": chat_template,
        "sequence_len": sequence_len, "limit": limit, "batch_size": batch_size,
        **({} if target_len is None else {"target_len": target_len}),
    }
    with atomic_output_dir(out, has_force=False) as tmp:
        _write(tmp, stats, shares, expert_groups, description)
    for site, s in stats.items():
        for task in s.load:
            busiest = max(max_load_ratio(row) for row in s.load[task])
            entropy = sum(s.entropy[task]) / len(s.entropy[task])
            tokens = "" if site_part(site) is None else f" {'source' if reads_encoder_tokens(site) else 'answer'}"
            echo(f"{site} / {task}: {s.tokens[task]}{tokens} tokens, busiest expert {busiest:.2f}x the even share, "
                 f"mean router entropy {entropy:.3f} nats")
    echo(f"routing numbers and figures: {out}")
    return out
