"""The `pesc` command line: one click group, each subcommand defined next to the code it drives."""

import json
import os
import sys

import click

from pesc import __version__
from pesc.errors import PescError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pesc")
def cli():
    """Turn a dense LLM into a sparse PESC Mixture-of-Experts model, tune it with QLoRA, export and publish it."""


@cli.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--num-experts", type=int, help="Planned experts per layer (dense checkpoints; default 8).")
@click.option("--top-k", type=int, help="Planned experts per token (dense checkpoints; default 2).")
@click.option("--adapter-dim", type=int, help="Planned adapter width (dense checkpoints; default 512).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def inspect(path, num_experts, top_k, adapter_dim, as_json):
    """Print architecture and total / active / trainable parameter counts, from config.json alone."""
    from pesc.checkpoint import read_config, resolve_pesc_config
    from pesc.summary import summarize

    config = resolve_pesc_config(read_config(path), num_experts=num_experts, top_k=top_k, adapter_dim=adapter_dim)
    summary = summarize(config)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo("\n".join(summary.lines()))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 1 (PESC_DEBUG=1 shows tracebacks)."""
    try:
        cli.main(args=argv, prog_name="pesc", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing was left half-written.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (PescError, ValueError, OSError) as error:
        if os.environ.get("PESC_DEBUG"):
            raise
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
