"""The numbers of `pesc routes` as files: `routes.json` (everything) and CSV tables (one row per number).

- `load.csv`: task, site, layer, expert, load
- `layers.csv`: task, site, layer, tokens, entropy, max_load_ratio (the busiest expert's load x E; 1 is even)
- `expert_groups.csv` (with --expert-group): task, site, layer, group, share
"""

import csv
import json
from pathlib import Path

from pesc.routing_analysis.records import reads_encoder_tokens, site_part
from pesc.routing_analysis.tally import SiteStats

JSON_FILE = "routes.json"
LOAD_CSV = "load.csv"
LAYERS_CSV = "layers.csv"
GROUPS_CSV = "expert_groups.csv"


def max_load_ratio(row: list[float]) -> float:
    return max(row) * len(row)


def routes_json(stats: dict[str, SiteStats], shares: dict | None, expert_groups: dict | None,
                description: dict) -> dict:
    sites = {}
    for site, s in stats.items():
        tasks = {
            task: {"tokens": s.tokens[task], "load": s.load[task], "entropy": s.entropy[task],
                   "max_load_ratio": [max_load_ratio(row) for row in s.load[task]]}
            for task in s.load
        }
        sites[site] = {"num_experts": s.num_experts, "top_k": s.top_k, "layers": s.layers, "tasks": tasks}
        if site_part(site) is not None:  # an encoder-decoder's: which part, and whose tokens its rows are
            sites[site].update(part=site_part(site), tokens_of="source" if reads_encoder_tokens(site) else "answer")
    result = {"pesc": description, "sites": sites}
    if expert_groups:
        result["expert_groups"] = expert_groups
        result["group_shares"] = shares
    return result


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def write_numbers(out: Path, stats: dict[str, SiteStats], shares: dict | None, expert_groups: dict | None,
                  description: dict) -> None:
    """routes.json and the CSV tables into `out`."""
    document = routes_json(stats, shares, expert_groups, description)
    (out / JSON_FILE).write_text(json.dumps(document, indent=2) + "\n")
    _write_csv(out / LOAD_CSV, ["task", "site", "layer", "expert", "load"], (
        (task, site, layer, expert, value)
        for site, s in stats.items() for task, load in s.load.items()
        for layer, row in zip(s.layers, load) for expert, value in enumerate(row)
    ))
    _write_csv(out / LAYERS_CSV, ["task", "site", "layer", "tokens", "entropy", "max_load_ratio"], (
        (task, site, layer, s.tokens[task], entropy, max_load_ratio(row))
        for site, s in stats.items() for task in s.load
        for layer, row, entropy in zip(s.layers, s.load[task], s.entropy[task])
    ))
    if expert_groups:
        _write_csv(out / GROUPS_CSV, ["task", "site", "layer", "group", "share"], (
            (task, site, layer, group, share)
            for site, per_task in shares.items() for task, per_group in per_task.items()
            for group, values in per_group.items() for layer, share in zip(stats[site].layers, values)
        ))
