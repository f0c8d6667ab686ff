"""`pesc import camelidae`: the command line of the Camelidae import (the work is in camelidae_import.py)."""

import click


@click.command("camelidae")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--link", is_flag=True, help="Hard-link safetensors shards instead of copying them (copy if impossible).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a folder pesc wrote (never another).")
def import_camelidae(src, out, link, force):
    """A published Camelidae (model_type camelidae) or Qwen2idae checkpoint SRC (folder or Hub id) as a pesc
    checkpoint at OUT: the same tensors in safetensors, pesc's model code, runs on current transformers."""
    from pesc.methods.pesc.camelidae_import import import_camelidae as run_import

    run_import(src, out, link=link, force=force, echo=click.echo)
