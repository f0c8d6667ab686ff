"""The `pesc` command line: one click group, each subcommand defined next to the code it drives."""

import json
import os
import signal
import sys
import threading

import click

from pesc import __version__
from pesc.errors import PescError, first_line
from pesc.evaluation.suites import SUITES
from pesc.quiet import silence_bitsandbytes_cpu_kernel_notice


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pesc")
def cli():
    """Turn a dense LLM into a sparse PESC Mixture-of-Experts model, tune it with QLoRA, export and publish it."""


class MethodCommand(click.Command):
    """A command that takes `--method NAME` and every registered method's settings as flags (`--num-experts`
    from `num_experts`), read when the command runs, so a method registered later has its flags too.

    Every method's flags parse (a recipe's `method:` may choose the method), and a flag that is not a setting of
    the chosen method is refused in one line when the command runs (`check_flags`). The help tells each method's
    truth: with `--method M` it lists M's settings alone, with M's defaults; without, each flag's default per
    method."""

    def parse_args(self, ctx, args):
        ctx.meta["pesc_method"] = _method_named_in(args)
        return super().parse_args(ctx, args)

    def get_params(self, ctx):
        return super().get_params(ctx) + method_setting_options()


def _method_named_in(args: list[str]) -> str | None:
    """The value of `--method` among raw arguments (help is printed before the options are processed)."""
    for position, arg in enumerate(args):
        if arg == "--method" and position + 1 < len(args):
            return args[position + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


class SettingOption(click.Option):
    """A method setting's flag; `owners` maps each method that has the setting to its declaration."""

    def __init__(self, *args, owners: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.owners = owners

    def get_help_record(self, ctx):
        chosen = ctx.meta.get("pesc_method")
        if chosen in self.owners:
            setting = self.owners[chosen]
            limits = _range(setting)
            self.help = f"{setting.help} (default {setting.default}{'' if limits == '-' else '; ' + limits})."
        elif chosen is None:
            defaults = ", ".join(f"{name} {setting.default}" for name, setting in self.owners.items())
            self.help = f"{next(iter(self.owners.values())).help} (default: {defaults})."
        else:
            return None  # not a setting of the chosen method (an unknown method shows none; the command names it)
        return super().get_help_record(ctx)


def _range(setting) -> str:
    """A setting's range: its own for one that is not stored (the seed), else its config class's declaration."""
    if setting.bounds:
        from pesc.settings import BOUNDS

        return BOUNDS[setting.bounds][1]
    return setting.method.config_class.range_text(setting.field)


def method_setting_options() -> list[click.Option]:
    """One option per setting name across the registered methods; which method it belongs to is checked later."""
    from pesc.methods import METHODS

    owners: dict = {}
    for method in METHODS.values():
        for setting in method.all_settings():
            owners.setdefault(setting.name, {})[method.name] = setting
    options = []
    for name, by_method in owners.items():
        setting = next(iter(by_method.values()))
        kind = int if setting.types == (int,) else float if float in setting.types else str
        options.append(SettingOption([setting.flag, name], type=kind, owners=by_method))
    return options


TRUST_REMOTE_CODE_OPTION = click.option(
    "--trust-remote-code", is_flag=True,
    help="Run Python code the model folder carries (its auto_map modules), as transformers' trust_remote_code does. "
    "Never needed for pesc's own methods or for families transformers ships.")

METHOD_OPTION = click.option("--method", "method_name", help="The method (default pesc; `pesc methods` lists them).")


@cli.command()
@click.argument("name", required=False)
def methods(name):
    """List the methods (paper, where the experts sit, routing, aux losses), or one method's settings: flag,
    default, range and config.json field."""
    from pesc.methods import METHODS, get_method

    if name is None:
        width = max(len(known) for known in METHODS)
        for known, method in METHODS.items():
            click.echo(f"{known:<{width}}  {method.description}")
        return
    method = get_method(name)
    click.echo(f"{method.name}: {method.description}")
    rows = [(s.flag, str(s.default), _range(s), s.field or "(not stored)", s.help)
            for s in method.all_settings()]
    header = ("flag / moe: key", "default", "range", "config.json", "meaning")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])


@cli.command(cls=MethodCommand)
@click.argument("path", type=click.Path(path_type=str))
@METHOD_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect(path, method_name, as_json, **setting_flags):
    """Print architecture and total / active / trainable parameter counts, from config.json alone.

    For a dense checkpoint the method's flags give the planned settings (defaults otherwise)."""
    from pesc.checkpoint.config import read_config, resolve_method_config
    from pesc.methods import check_flags, get_method, method_for_model_type, method_of

    config = read_config(path)
    converted = method_for_model_type(config.model_type)
    chosen = (None if method_name else converted) or get_method(method_name)
    flags = check_flags(chosen, setting_flags)
    if converted is not None and flags:
        flag = "--" + next(iter(flags)).replace("_", "-")
        raise PescError(f"{flag}: {path} is already a {converted.label} checkpoint, whose settings are in its "
                        "config.json; the setting flags plan the conversion of a dense model")
    config = resolve_method_config(config, method_name, flags)
    summary = method_of(config).parameter_summary(config)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo("\n".join(summary.lines()))


@cli.command(cls=MethodCommand)
@click.argument("src")
@click.argument("out", type=click.Path(path_type=str))
@METHOD_OPTION
@click.option("--config", "recipe", type=click.Path(path_type=str),
              help="YAML file or shipped recipe name (`pesc recipes`); its method: and moe: sections (flags win).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest new shard file (e.g. 5GB, 500MB).")
@click.option("--link", is_flag=True, help="Hard-link the base shards instead of copying them (copy if impossible).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a folder pesc wrote (never another).")
def convert(src, out, method_name, recipe, max_shard_size, link, force, **setting_flags):
    """Turn the dense checkpoint SRC (folder, Hub id or .gguf file) into a sparse checkpoint of a method (default
    PESC) at OUT, in bounded memory.

    A .gguf SRC is first dequantized through transformers (needs `pip install gguf`; the whole model is
    loaded once, so the memory bound does not hold for it)."""
    from pesc.convert import convert as run_convert, resolve_settings

    settings = resolve_settings(setting_flags, recipe, method_name=method_name, max_shard_size=max_shard_size)
    run_convert(src, out, settings, link=link, force=force, echo=click.echo)


@cli.command()
@click.argument("source", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Dtype of the exported weights (the LoRA merge itself is done in float32).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard file (e.g. 5GB, 500MB).")
@click.option("--base", type=click.Path(path_type=str), help="The LoRA's base model, if it moved since training.")
@click.option("--base-model-id", help="Hub id of the base model for the card's metadata (default: from the base).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a folder pesc wrote (never another).")
@click.option("--eval", "eval_results", type=click.Path(path_type=str),
              help="A `pesc eval` results.json: its scores go into the model card.")
def export(source, out, dtype, max_shard_size, base, base_model_id, force, eval_results):
    """Merge a training run (RUN_DIR or one of its checkpoints) into a sparse Hugging Face checkpoint at OUT."""
    from pesc.export import export as run_export

    run_export(source, out, dtype=dtype, max_shard_size=max_shard_size, force=force, base=base,
               base_model_id=base_model_id, eval_results=eval_results,
               log=lambda message: click.echo(message, err=True))


@cli.command()
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, help="Hub repository, USER/NAME (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", help="Branch to push to (created if missing; default main).")
@click.option("--commit-message", help="Commit message of the upload.")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded and print the card; send nothing.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the `hf auth login` cache).")
@click.option("--include-file", "include_files", multiple=True, metavar="PATH",
              help="Upload this file although its name looks like a secret (.env, *token*, *.pem, id_*, ...), which "
              "push otherwise leaves out. Repeatable.")
def push(folder, repo_id, private, revision, commit_message, dry_run, token, include_files):
    """Publish a model folder (from pesc export or pesc convert) to the Hugging Face Hub."""
    from pesc.hub import push as run_push

    run_push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
             dry_run=dry_run, token=token, include_files=include_files, echo=click.echo)


@cli.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--prompt", required=True, help="The user message.")
@click.option("--system", help="A system message (chat template) or preamble.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy decoding.")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as plain text.")
@TRUST_REMOTE_CODE_OPTION
def generate(path, prompt, system, max_new_tokens, temperature, no_chat_template, trust_remote_code):
    """Generate a reply from a PESC (or dense) model folder, streaming tokens to the terminal."""
    from pesc.generate import generate as run_generate

    run_generate(path, prompt, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                 chat_template=not no_chat_template, trust_remote_code=trust_remote_code)


@cli.command()
@click.argument("out", type=click.Path(path_type=str))
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Dtype to serve in (default: the checkpoint's, as config.json records it; auto: vLLM's choice, "
              "which downcasts float32 to bfloat16).")
@click.option("--kv-cache-memory", help="KV-cache size, e.g. 4GB or 512MiB (default on the CPU: a quarter of the "
              "memory available; on a GPU: vLLM's own).")
@click.option("--vllm-python", type=click.Path(path_type=str), help="The Python that has vLLM (default: this one if "
              "vLLM imports, else $PESC_VLLM_VENV or the clone's .venv-vllm).")
@click.option("--trust-remote-code", is_flag=True,
              help="Let vLLM run the Python code the folder carries although pesc did not write it (a pesc "
              "checkpoint whose code is this pesc's own is served without it).")
def serve(out, vllm_args, host, port, dtype, kv_cache_memory, vllm_python, trust_remote_code):
    """Serve the model folder OUT with vLLM's OpenAI-compatible server until Ctrl-C; arguments after `--` go to
    vLLM (e.g. -- --max-model-len 4096). Prints which path serves it (native vLLM model or Transformers backend)
    and the URL for the `openai` client; see docs/serving.md."""
    from pesc.serving.serve import serve as run_serve

    run_serve(out, host=host, port=port, dtype=dtype, kv_cache_memory=kv_cache_memory, vllm_python=vllm_python,
              trust_remote_code=trust_remote_code, vllm_args=vllm_args, echo=click.echo)


@cli.command()
@click.argument("config", type=click.Path(path_type=str))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (dotted for nested, e.g. moe.top_k=2); values are YAML. Repeatable.")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint-N.")
def train(config, overrides, resume):
    """QLoRA-tune a PESC model (or a dense one upcycled in memory) from CONFIG, a YAML file or a shipped recipe's
    name (`pesc recipes`; an existing file wins); see docs/training.md."""
    from pesc.training.run import setup_logging, train as run_training

    setup_logging()
    final = run_training(config, list(overrides), resume=resume)
    click.echo(f"trained model: {final}")


@cli.command("tiny-model")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--family", type=click.Choice(["llama", "mistral", "qwen2", "t5"]), default="llama", show_default=True,
              help="t5: a T5 v1.1 encoder-decoder (gated-GELU, Flan-T5's layout) with a T5-style tokenizer")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def tiny_model(out, family, seed):
    """Write a tiny random dense checkpoint (with a ChatML tokenizer; T5: T5's special tokens) for quick experiments
    and the tiny recipes.

    OUT must not exist, or be an empty folder; missing parent folders are created. It is written beside OUT
    and renamed into place."""
    from pesc.atomic import atomic_output_dir
    from pesc.testing import save_tiny_dense
    from pesc.testing.tiny import build_tiny_t5_tokenizer
    from pesc.testing.tiny_t5 import save_tiny_t5

    with atomic_output_dir(out, allow_empty=True, has_force=False) as tmp:
        if family == "t5":
            save_tiny_t5(tmp, "t5-v1.1", seed=seed)
            build_tiny_t5_tokenizer().save_pretrained(tmp)
        else:
            save_tiny_dense(tmp, family, seed=seed)
    click.echo(f"wrote {out}")


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the recipes shipped with pesc: name, method (or accelerate, for a launch config) and what it is for.

    `pesc train NAME` and `pesc convert --config NAME` take a name; `pesc recipes show NAME > my.yaml` gives a
    copy to edit. A recipe's `pesc:NAME` dataset is demo data shipped with pesc, wherever the copy lives."""
    if ctx.invoked_subcommand is not None:
        return
    from pesc.recipe import load_recipe, recipe_names, recipe_summary, shipped_recipe

    rows = []
    for name in recipe_names():
        path = shipped_recipe(name)
        kind = "accelerate" if name.startswith("accelerate/") else load_recipe(path).get("method") or "pesc"
        rows.append((name, kind, recipe_summary(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, kind, summary in rows:
        click.echo(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {summary}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print the shipped recipe NAME unchanged (`> my.yaml` makes a copy that trains as the original)."""
    from pesc.recipe import shipped_recipe

    click.echo(shipped_recipe(name).read_text(encoding="utf-8"), nl=False)


class _ImportGroup(click.Group):
    """`pesc import FORMAT`: one subcommand per format a registered method imports (`Method.import_commands`),
    loaded only when named or listed."""

    def _sources(self) -> dict[str, str]:
        from pesc.methods import METHODS

        return {name: path for method in METHODS.values() for name, path in method.import_commands.items()}

    def list_commands(self, ctx):
        return sorted(self._sources())

    def get_command(self, ctx, name):
        import importlib

        path = self._sources().get(name)
        if path is None:
            return None
        module, attribute = path.split(":")
        return getattr(importlib.import_module(module), attribute)


@cli.group("import", cls=_ImportGroup)
def import_group():
    """Bring published MoE checkpoints of other formats over as pesc checkpoints."""


@cli.command("from-gguf")
@click.argument("gguf_file", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the written weights (float32 keeps the dequantized values exactly).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a folder pesc wrote (never another).")
def from_gguf(gguf_file, out, dtype, force):
    """Dequantize a GGUF model file into a dense Hugging Face checkpoint (safetensors + tokenizer) at OUT.

    Needs the gguf package (pip install gguf). `pesc convert` also takes a .gguf SRC directly."""
    from pesc.gguf import save_dense_from_gguf

    save_dense_from_gguf(gguf_file, out, dtype=dtype, echo=click.echo, force=force)


@cli.command()
@click.argument("model_a", type=click.Path(path_type=str))
@click.argument("model_b", type=click.Path(path_type=str))
@click.option("--prompt", default=None, help="Text to run both models on (default: a fixed sentence).")
@click.option("--atol", type=float, help="Fail (exit 1) if the largest logit difference exceeds this.")
@TRUST_REMOTE_CODE_OPTION
def compare(model_a, model_b, prompt, atol, trust_remote_code):
    """Print the largest |logit difference| of two models on one prompt (e.g. converted vs dense)."""
    from pesc.compare import DEFAULT_PROMPT, max_logit_difference

    if atol is not None and not atol >= 0:  # NaN too: no difference would ever exceed it
        raise PescError(f"--atol must be a number >= 0, got {atol}")
    difference = max_logit_difference(model_a, model_b, DEFAULT_PROMPT if prompt is None else prompt,
                                      trust_remote_code=trust_remote_code)
    click.echo(f"max |logits({model_a}) - logits({model_b})| = {difference:.3g}")
    if atol is not None and difference > atol:
        raise PescError(f"the models differ by {difference:.3g}, more than --atol {atol:g}")


@cli.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--tasks", help="lm-eval task or group names, comma-separated (e.g. hellaswag,arc_easy).")
@click.option("--suite", type=click.Choice(list(SUITES)),
              help="A paper's benchmark list with its few-shot settings (instead of --tasks); see docs/eval.md.")
@click.option("--num-fewshot", type=int, help="Few-shot examples for every --tasks task (default: each task's own).")
@click.option("--limit", type=int, help="Evaluate only the first N examples of each task (a quick check).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=str), help="Results folder (default: eval-results/NAME of MODEL).")
@click.option("--include-path", type=click.Path(path_type=str),
              help='A folder of your own lm-eval task YAML files (an example: docs/eval.md, "A local task").')
@click.option("--compare", type=click.Path(path_type=str), help="A baseline (e.g. the dense model) evaluated on the same "
              "tasks; one side-by-side table.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--load-in-4bit", is_flag=True, help="A training run: load its base in 4-bit, as it was trained.")
@click.option("--confirm-run-unsafe-code", is_flag=True,
              help="Allow code-execution tasks (humaneval, mbpp): they RUN the model's generated code on this machine.")
@TRUST_REMOTE_CODE_OPTION
def eval_command(model, out, **options):
    """Benchmark MODEL (exported or converted PESC folder, dense folder, or a training run / checkpoint) with
    lm-evaluation-harness; writes results.json and a Markdown table (results.md) and prints the table."""
    from pathlib import Path

    from pesc.evaluation.run import run_eval

    run_eval(model, out or Path("eval-results") / Path(model).resolve().name, echo=click.echo, **options)


@cli.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", "data", multiple=True, required=True, metavar="[TASK=]FILE",
              help="A data file in a training format (pesc:NAME: demo data shipped with pesc); TASK= names its task "
              "(files may share one). Repeatable.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder (must not exist).")
@click.option("--type", "data_type",
              type=click.Choice(["messages", "sharegpt", "alpaca", "camelidae", "input_target"]),
              default="messages", show_default=True, help="Format of every --data file (input_target: P3 / T0 rows).")
@click.option("--chat-template", help="camelidae, chatml or a Jinja string (default: as MODEL was trained, else the "
              "tokenizer's own).")
@click.option("--sequence-len", type=int, help="Truncate rows to N tokens (default: the run's, else 2048).")
@click.option("--limit", type=int, help="Only N rows of each file (a fixed sample): a quick look.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--expert-group", multiple=True, metavar="NAME=INDICES",
              help="A group of experts, e.g. knowledge=0-2; adds each group's share of router mass per task. "
              "Repeatable.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--load-in-4bit", is_flag=True, help="A training run: load its base in 4-bit, as it was trained.")
@TRUST_REMOTE_CODE_OPTION
def routes(model, data, out, **options):
    """Run data through MODEL (PESC folder, export or training run) and write what its routers do: expert load
    per layer and task (heatmaps, per-layer balance), router entropy, as PNGs, JSON and CSV; see docs/routes.md."""
    from pesc.routing_analysis.run import run_routes

    run_routes(model, list(data), out, echo=click.echo, **options)


def _terminated(signum, frame):
    """SIGTERM (`kill`, a scheduler's stop) unwinds like Ctrl-C, so every temporary folder is removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 1 (PESC_DEBUG=1 shows tracebacks)."""
    silence_bitsandbytes_cpu_kernel_notice()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=argv, prog_name="pesc", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as error:
        # click turns Ctrl-C into Abort (after printing a newline to end the ^C line)
        interrupted = isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt)
        click.echo("Interrupted; nothing was left half-written." if interrupted else "Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (PescError, ValueError, OSError) as error:
        if os.environ.get("PESC_DEBUG"):
            raise
        click.echo(f"Error: {error if isinstance(error, PescError) else first_line(error)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
