"""`pesc routes`: the numbers equal a direct count from the routers, the pictures are drawn, bad input is one line.

The counting is checked on hand-built routing records for both router kinds (top-k and dense), and end to end
against router outputs captured in the test with forward hooks on a model run row by row, without padding
(`pesc routes` runs padded batches: padding must be left out of every count).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from pesc.cli import main
from pesc.modeling.moe_routing import RoutingRecord
from pesc.routing_analysis.tally import RoutingTally, group_shares

ROWS = {
    "a.jsonl": ["Spell 'chair'.", "What is 8 + 16?", "Name a colour.", "Count to five, please, slowly."],
    "b.jsonl": ["What is the first letter of 'earth'?", "Say hi."],
    "c.jsonl": ["Translate 'cat' to French.", "Is 7 prime?", "Reverse 'abc'."],
}
ANSWER = "Here is a short answer."


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routes-data")
    for name, questions in ROWS.items():
        (folder / name).write_text("".join(json.dumps({"messages": _messages(q)}) + "\n" for q in questions))
    return folder


def _data_args(data_dir: Path) -> list[str]:
    """Three files, two tasks: `a` (by the file's stem) and `other` (b and c together)."""
    return ["--data", str(data_dir / "a.jsonl"), "--data", f"other={data_dir / 'b.jsonl'}",
            "--data", f"other={data_dir / 'c.jsonl'}"]


@pytest.fixture(scope="module")
def drawn():
    """{file name: matplotlib Figure} of every picture the `routes_out` run saved, to read its artists back."""
    return {}


@pytest.fixture(scope="module")
def routes_out(exported, data_dir, tmp_path_factory, drawn):
    from pesc.routing_analysis import figures

    out = tmp_path_factory.mktemp("routes") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_figure", _keeping_figure(figures._figure, drawn))
        main(["routes", str(exported), *_data_args(data_dir), "--out", str(out), "--batch-size", "3",
              "--expert-group", "first=0,1", "--expert-group", "last=2-3"])
    return out


def _keeping_figure(make_figure, drawn):
    def figure(*args, **kwargs):
        made = make_figure(*args, **kwargs)
        save = made.savefig

        def savefig(path):
            drawn[Path(path).name] = made
            save(path)

        made.savefig = savefig
        return made
    return figure


# ---- counting, on hand-built records ----

def test_top_k_load_is_the_share_of_assignments_summed_over_batches():
    tally = RoutingTally()
    logits = torch.zeros(3, 4)  # uniform router: entropy ln 4 per token
    tally.add("t", [RoutingRecord("mlp", 0, logits, torch.tensor([[0, 1], [0, 2], [0, 1]]))])
    tally.add("t", [RoutingRecord("mlp", 0, logits[:1], torch.tensor([[3, 0]]))])
    stats = tally.stats()["mlp"]
    assert stats.top_k == 2 and stats.layers == [0] and stats.tokens == {"t": 4}
    assert stats.load["t"] == [[4 / 8, 2 / 8, 1 / 8, 1 / 8]]
    assert stats.entropy["t"] == pytest.approx([math.log(4)], abs=1e-12)


def test_dense_load_is_the_mean_router_probability():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]], dtype=torch.float64)
    tally = RoutingTally()
    tally.add("t", [RoutingRecord("gate_proj", 3, probs.log(), None)])
    stats = tally.stats()["gate_proj"]
    assert stats.top_k is None and stats.layers == [3]
    # the softmax is summed in float32, as training's load log sums it: 1e-6 covers its rounding
    assert stats.load["t"][0] == pytest.approx([0.4, 0.1, 0.15, 0.35], abs=1e-6)
    entropy = -(probs * probs.log()).sum(dim=-1).mean()
    assert stats.entropy["t"][0] == pytest.approx(float(entropy), abs=1e-12)


def test_group_shares_equal_the_router_mass_set_on_each_group():
    """LoRAMoE's figure: dense routers set by hand to put 80% of the mass on the task's own expert group
    (the load sums the softmax in float32: 1e-6)."""
    knowledge = torch.tensor([[0.5, 0.3, 0.1, 0.1]] * 5, dtype=torch.float64)
    task = torch.tensor([[0.05, 0.15, 0.4, 0.4]] * 7, dtype=torch.float64)
    tally = RoutingTally()
    for layer in range(2):
        tally.add("world knowledge", [RoutingRecord("down_proj", layer, knowledge.log(), None)])
        tally.add("downstream task", [RoutingRecord("down_proj", layer, task.log(), None)])
    shares = group_shares(tally.stats()["down_proj"], {"knowledge": [0, 1], "task": [2, 3]})
    assert shares["world knowledge"]["knowledge"] == pytest.approx([0.8, 0.8], abs=1e-6)
    assert shares["world knowledge"]["task"] == pytest.approx([0.2, 0.2], abs=1e-6)
    assert shares["downstream task"]["knowledge"] == pytest.approx([0.2, 0.2], abs=1e-6)
    assert shares["downstream task"]["task"] == pytest.approx([0.8, 0.8], abs=1e-6)


# ---- end to end, against a direct count ----

def _direct_counts(model, tokenizer, questions: list[str], num_experts: int, top_k: int):
    """Per layer: (tokens, assignment counts [E], summed entropy) from hooks on the routers, one row at a time."""
    captured = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("mlp.moe_adapter.router"):
            layer = int(name.split("layers.")[1].split(".")[0])
            hooks.append(module.register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o)))
    counts, entropy, tokens = {}, {}, 0
    try:
        for question in questions:
            text = tokenizer.apply_chat_template(_messages(question), tokenize=False)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            tokens += ids.shape[1]
            with torch.no_grad():
                model(input_ids=ids)
            for layer, logits in captured.items():
                top = torch.topk(logits.float(), top_k + 1, dim=-1).values
                assert float((top[:, top_k - 1] - top[:, top_k]).min()) > 1e-4  # no near-tie padding noise could flip
                chosen = torch.topk(logits, top_k, dim=-1).indices.reshape(-1)
                counts[layer] = counts.get(layer, 0) + torch.bincount(chosen, minlength=num_experts)
                probs = torch.softmax(logits.double(), dim=-1)
                entropy[layer] = entropy.get(layer, 0.0) + float(-(probs * probs.clamp_min(1e-300).log()).sum())
    finally:
        for hook in hooks:
            hook.remove()
    return tokens, counts, entropy


@pytest.mark.parametrize("source", ["exported", "trained_run"])
def test_loads_in_the_json_equal_a_direct_count_of_the_router_outputs(source, request, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from pesc.checkpoint.trained_run import load_trained_model
    from pesc.generate import load_folder_model

    path = request.getfixturevalue(source)
    if source == "exported":
        model, tokenizer = load_folder_model(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    else:
        model = load_trained_model(path)[0]
        tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_llama_dir"))
    main(["routes", str(path), *_data_args(data_dir), "--out", str(tmp_path / "out"), "--batch-size", "3"])
    site = json.loads((tmp_path / "out" / "routes.json").read_text())["sites"]["mlp"]
    num_experts, top_k = site["num_experts"], site["top_k"]
    assert (num_experts, top_k, site["layers"]) == (4, 2, [0, 1])
    questions = {"a": ROWS["a.jsonl"], "other": ROWS["b.jsonl"] + ROWS["c.jsonl"]}
    assert list(site["tasks"]) == list(questions)
    for task, rows in questions.items():
        tokens, counts, entropy = _direct_counts(model, tokenizer, rows, num_experts, top_k)
        numbers = site["tasks"][task]
        assert numbers["tokens"] == tokens
        for layer in site["layers"]:
            assert numbers["load"][layer] == (counts[layer].double() / (tokens * top_k)).tolist()
            assert numbers["entropy"][layer] == pytest.approx(entropy[layer] / tokens, rel=1e-5)


def test_csv_tables_hold_the_json_numbers(routes_out):
    import csv

    document = json.loads((routes_out / "routes.json").read_text())
    site = document["sites"]["mlp"]
    with open(routes_out / "load.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 2 * 4  # tasks x layers x experts
    for row in rows:
        assert float(row["load"]) == site["tasks"][row["task"]]["load"][int(row["layer"])][int(row["expert"])]
    with open(routes_out / "expert_groups.csv") as file:
        shares = list(csv.DictReader(file))
    for row in shares:
        load = site["tasks"][row["task"]]["load"][int(row["layer"])]
        expected = load[0] + load[1] if row["group"] == "first" else load[2] + load[3]
        assert float(row["share"]) == pytest.approx(expected, abs=1e-15)
        assert float(row["share"]) == document["group_shares"]["mlp"][row["task"]][row["group"]][int(row["layer"])]


@pytest.mark.parametrize("name, size", [
    ("heatmap_mlp.png", (850, 260)),  # (1.5 + 3.5 * 2 tasks) x (2 + 0.3 * 2 layers) inches at 100 DPI
    ("balance_mlp.png", (850, 260)),  # as the heatmap
    ("balance/mlp_layer0.png", (720, 400)),  # (6 + 0.3 * 4 experts) x 4
    ("balance/mlp_layer1.png", (720, 400)),
    ("entropy.png", (400, 350)),  # (0.5 + 3.5 * 1 site) x 3.5
    ("expert_groups.png", (400, 350)),
])
def test_each_png_exists_with_its_size_and_is_not_blank(routes_out, name, size):
    from matplotlib.image import imread

    pixels = imread(routes_out / name)
    assert (pixels.shape[1], pixels.shape[0]) == size
    rgb = torch.from_numpy(pixels[..., :3].copy())
    coloured = (rgb.amax(dim=-1) - rgb.amin(dim=-1)) > 0.25  # text, axes and background are grey
    assert float(coloured.double().mean()) > 0.003  # the data is drawn in colour: cells, bars, lines (0.5% of pixels)


def test_no_text_in_any_picture_is_under_8_points(routes_out, drawn):
    """Readable when a 3.5-inch panel is printed in one column."""
    from matplotlib.text import Text

    assert len(drawn) == 6
    for name, figure in drawn.items():
        sizes = [text.get_fontsize() for text in figure.findobj(Text) if text.get_text()]
        assert sizes and min(sizes) >= 8, name


def test_balance_png_draws_every_layers_load_over_the_even_share_from_the_json(routes_out, drawn):
    """One picture for all layers: each cell is the JSON's load x E, coloured on a scale whose centre (white) is 1."""
    site = json.loads((routes_out / "routes.json").read_text())["sites"]["mlp"]
    panels = [axes for axes in drawn["balance_mlp.png"].axes if axes.images]
    assert [axes.get_title().split(" (")[0] for axes in panels] == list(site["tasks"])
    for axes, numbers in zip(panels, site["tasks"].values()):
        cells = axes.images[0].get_array().tolist()
        assert cells == [[value * 4 for value in row] for row in numbers["load"]]
        assert [max(row) for row in cells] == numbers["max_load_ratio"]  # x * 4 is exact in binary floats
        norm = axes.images[0].norm
        assert (norm.vmin, norm.vcenter) == (0, 1) and norm.vmax >= 2
    assert len({axes.images[0].norm.vmax for axes in panels}) == 1  # one colour scale for the tasks


def _entropy_limits(entropy: list[float], tmp_path) -> tuple[float, float]:
    """The y limits of entropy.png for one task whose layers have these entropies (4 experts)."""
    from pesc.routing_analysis import figures
    from pesc.routing_analysis.tally import SiteStats

    layers = list(range(len(entropy)))
    stats = SiteStats(4, 2, layers, {"t": 1}, {"t": [[0.25] * 4 for _ in layers]}, {"t": entropy})
    drawn = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_figure", _keeping_figure(figures._figure, drawn))
        figures.plot_entropy({"mlp": stats}, tmp_path / "entropy.png")
    return drawn["entropy.png"].axes[0].get_ylim()


def test_entropy_near_ln_e_is_drawn_on_an_axis_around_ln_e_not_from_0(tmp_path):
    """Values 0.5% under ln 4: the axis spans ln 4 +- 5% and a 5% margin (not 0..ln 4, where the line would lie
    on its reference), so the gap shows, yet it is no wider than the 10% floor: noise is not blown up."""
    ln4 = math.log(4)
    low, high = _entropy_limits([0.995 * ln4, 0.996 * ln4], tmp_path)
    assert (low, high) == pytest.approx((0.945 * ln4, 1.055 * ln4), rel=1e-12)  # 0.95/1.05 -+ 5% of 0.1


def test_entropy_far_from_ln_e_keeps_the_data_and_the_reference_in_view(tmp_path):
    ln4 = math.log(4)
    low, high = _entropy_limits([0.1, 1.0], tmp_path)
    margin = 0.05 * (1.05 * ln4 - 0.1)
    assert (low, high) == pytest.approx((0.1 - margin, 1.05 * ln4 + margin), rel=1e-12)


def test_entropy_axis_is_around_ln_e_with_the_uniform_line(routes_out, drawn):
    site = json.loads((routes_out / "routes.json").read_text())["sites"]["mlp"]
    axes = drawn["entropy.png"].axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert lines == {**{task: n["entropy"] for task, n in site["tasks"].items()}, "uniform (ln 4)": [math.log(4)] * 2}
    low, high = axes.get_ylim()
    assert low <= min(min(n["entropy"]) for n in site["tasks"].values()) and high >= math.log(4)


def test_heatmaps_share_one_colour_scale(routes_out, monkeypatch, tmp_path):
    """Both panels' colour scale runs from 0 to the largest load of the whole run."""
    from pesc.routing_analysis import figures
    from pesc.routing_analysis.tally import SiteStats

    site = json.loads((routes_out / "routes.json").read_text())["sites"]["mlp"]
    stats = SiteStats(4, 2, site["layers"], {t: n["tokens"] for t, n in site["tasks"].items()},
                      {t: n["load"] for t, n in site["tasks"].items()})
    drawn = {}
    monkeypatch.setattr(figures, "_figure", _keeping_figure(figures._figure, drawn))
    figures.plot_heatmap("mlp", stats, 0.9, tmp_path / "h.png")
    assert [axes.images[0].get_clim() for axes in drawn["h.png"].axes if axes.images] == [(0, 0.9), (0, 0.9)]


# ---- bad input ----

def _fails(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case, message", [
    ("missing model", "does not exist"),
    ("missing data", "data file not found"),
    ("invalid JSON", "row 2: invalid JSON"),
    ("wrong format", "row 1: missing key 'messages'"),
    ("binary data", "(not UTF-8 text): give a readable data file"),
    ("out exists", "already exists"),
    ("bad group", "write NAME=INDICES"),
    ("overlapping groups", "expert 1 is in both groups 'x' and 'y'"),
    ("batch size", "--batch-size must be >= 1"),
    ("empty task", "give FILE or TASK=FILE"),
    ("empty range", "the range 3-1 is empty"),
])
def test_bad_input_is_one_line_before_the_weights_load(case, message, exported, data_dir, tmp_path, capsys,
                                                       monkeypatch):
    import pesc.evaluation.loading as loading

    monkeypatch.setattr(loading, "load_eval_model", lambda *a, **k: pytest.fail("weights loaded despite bad input"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": _messages("hi")}) + "\n{not json\n")
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "hi", "output": "ho"}) + "\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    model, data, out, extra = exported, data_dir / "a.jsonl", tmp_path / "out", []
    if case == "missing model":
        model = tmp_path / "nope"
    elif case == "missing data":
        data = tmp_path / "nope.jsonl"
    elif case == "invalid JSON":
        data = tmp_path / "bad.jsonl"
    elif case == "wrong format":
        data = tmp_path / "alpaca.jsonl"
    elif case == "binary data":
        data = tmp_path / "binary.jsonl"
        data.write_bytes(b"\xff\xfe\x00garbage")
    elif case == "out exists":
        out = tmp_path / "exists"
    elif case == "bad group":
        extra = ["--expert-group", "x=a,b"]
    elif case == "overlapping groups":
        extra = ["--expert-group", "x=0,1", "--expert-group", "y=1-2"]
    elif case == "batch size":
        extra = ["--batch-size", "0"]
    elif case == "empty range":
        extra = ["--expert-group", "x=3-1"]
    elif case == "empty task":
        data = f"={data}"
    err = _fails(["routes", model, "--data", data, "--out", out, *extra], capsys)
    assert message in err
    assert not out.exists() or case == "out exists"


def test_a_model_without_routers_is_one_line(tiny_llama_dir, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["routes", str(tiny_llama_dir), "--data", str(data_dir / "b.jsonl"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: the model has no routers (a dense model?)")
    assert not (tmp_path / "out").exists()


def test_an_expert_group_beyond_the_experts_fails_and_writes_nothing(exported, data_dir, tmp_path, capsys):
    """Only the routing records tell how many experts a site has: this one is found after the run (progress bars
    on stderr before it), and still nothing is written."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["routes", str(exported), "--data", str(data_dir / "b.jsonl"), "--out", str(out),
              "--expert-group", "x=2-4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == "Error: expert group 'x': expert 4 does not exist (mlp routes 4 experts, 0 to 3)"
    assert not out.exists()


# ---- an encoder-decoder (T5) ----

@pytest.fixture(scope="module")
def t5_mov(tmp_path_factory):
    """A tiny T5 v1.1 converted to MoV (4 experts) with its routers perturbed, so that routing is not uniform."""
    from pesc.testing.perturbed import save_perturbed_checkpoint
    from pesc.testing.tiny import build_tiny_t5_tokenizer
    from pesc.testing.tiny_t5 import save_tiny_t5

    root = tmp_path_factory.mktemp("t5-routes")
    dense = save_tiny_t5(root / "t5", "t5-v1.1")
    build_tiny_t5_tokenizer().save_pretrained(dense)
    return save_perturbed_checkpoint(dense, root / "mov", "mov", scale=0.5, num_experts=4)


def _t5_direct_loads(folder, questions: list[str]) -> tuple[int, int, dict]:
    """(source tokens, answer tokens, {(site, layer): summed router probabilities}) of the model run one unpadded row
    at a time: the source (the question, no template) and the answer each tokenized here and ended by EOS."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pesc.methods import register_auto_classes

    register_auto_classes()
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sources = targets = 0
    sums = {}
    for question in questions:
        source = tokenizer(question, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        target = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sources, targets = sources + len(source), targets + len(target)
        with torch.no_grad():
            records = model(input_ids=torch.tensor([source]), labels=torch.tensor([target]),
                            output_routing_records=True).routing_records
        for record in records:
            key = (record.site, record.layer)
            sums[key] = sums.get(key, 0) + torch.softmax(record.logits.double(), dim=-1).sum(0)
    return sources, targets, sums


def test_t5_routes_count_encoder_and_decoder_sites_apart_on_their_own_tokens(t5_mov, data_dir, tmp_path):
    """The encoder's sites (and the cross-attention's keys / values, which read the encoder's output) count the source
    tokens, the decoder's the answer tokens; padded batches of 3 give each site's load of the unpadded rows."""
    out = tmp_path / "out"
    main(["routes", str(t5_mov), *_data_args(data_dir), "--out", str(out), "--batch-size", "3"])
    sites = json.loads((out / "routes.json").read_text())["sites"]
    heads = [f".head{h}" for h in range(4)]
    expected_parts = {
        **{f"encoder.self_attn.{kv}{h}": ("encoder", "source") for kv in "kv" for h in heads},
        "encoder.ffn.act": ("encoder", "source"),
        **{f"decoder.self_attn.{kv}{h}": ("decoder", "answer") for kv in "kv" for h in heads},
        **{f"decoder.cross_attn.{kv}{h}": ("cross-attention", "source") for kv in "kv" for h in heads},
        "decoder.ffn.act": ("decoder", "answer"),
    }
    assert {site: (s["part"], s["tokens_of"]) for site, s in sites.items()} == expected_parts
    questions = {"a": ROWS["a.jsonl"], "other": ROWS["b.jsonl"] + ROWS["c.jsonl"]}
    uniform = math.log(4)
    for task, rows in questions.items():
        sources, targets, sums = _t5_direct_loads(t5_mov, rows)
        assert sources != targets  # the two counts tell the sides apart
        for site, (_, side) in expected_parts.items():
            numbers = sites[site]["tasks"][task]
            assert numbers["tokens"] == (sources if side == "source" else targets), site
            for layer in (0, 1):
                # float32 router logits of a padded batch vs one unpadded row: each probability differs by ~1e-7
                # (float32 rounding of a 32-wide matmul); 1e-5 bounds that with a margin
                assert numbers["load"][layer] == pytest.approx(
                    (sums[site, layer] / numbers["tokens"]).tolist(), abs=1e-5), (site, layer)
        assert min(min(sites[site]["tasks"][task]["entropy"]) for site in sites) < 0.9 * uniform  # not uniform
    assert (out / "heatmap_encoder.ffn.act.png").is_file() and (out / "heatmap_decoder.ffn.act.png").is_file()
    assert (out / "balance" / "decoder.cross_attn.v.head3_layer1.png").is_file()


def test_t5_entropy_has_a_row_per_part(t5_mov, data_dir, tmp_path, monkeypatch):
    """entropy.png: encoder, cross-attention and decoder sites in rows of their own, each row labelled by its part."""
    from pesc.routing_analysis import figures

    drawn = {}
    monkeypatch.setattr(figures, "_figure", _keeping_figure(figures._figure, drawn))
    main(["routes", str(t5_mov), "--data", str(data_dir / "b.jsonl"), "--out", str(tmp_path / "out")])
    rows = {}
    for axes in drawn["entropy.png"].axes:
        if axes.axison:
            rows.setdefault(round(axes.get_position().y0, 3), set()).add(axes.get_ylabel().partition(":")[0])
    assert sorted(rows.values(), key=sorted) == [{"cross-attention"}, {"decoder"}, {"encoder"}]
    assert drawn["entropy.png"].get_size_inches().tolist() == [0.5 + 3.5 * 9, 3.5 * 3]  # decoder: 8 heads' + ffn


def test_t5_routes_read_input_target_rows(t5_mov, tmp_path):
    """P3 / T0-style rows (`--type input_target`): the encoder counts the inputs' tokens, the decoder the targets'."""
    from transformers import AutoTokenizer

    rows = [{"input": "What is 2 + 2?", "target": "4"}, {"input": "Say the first letter of 'earth'.", "target": "e"}]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    main(["routes", str(t5_mov), "--data", str(data), "--type", "input_target", "--out", str(tmp_path / "out")])
    sites = json.loads((tmp_path / "out" / "routes.json").read_text())["sites"]
    tokenizer = AutoTokenizer.from_pretrained(t5_mov)
    count = lambda key: sum(len(tokenizer(row[key], add_special_tokens=False)["input_ids"]) + 1 for row in rows)  # noqa: E731
    assert sites["encoder.ffn.act"]["tasks"]["sums"]["tokens"] == count("input")
    assert sites["decoder.cross_attn.k.head0"]["tasks"]["sums"]["tokens"] == count("input")
    assert sites["decoder.ffn.act"]["tasks"]["sums"]["tokens"] == count("target")
