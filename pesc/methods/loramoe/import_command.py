"""`pesc import loramoe`: the command line of the official-adapter import (the work is in official_import.py)."""

import click


@click.command("loramoe")
@click.argument("adapter_dir", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--base", required=True, help="The dense model the adapter was trained on (folder or Hub id).")
@click.option("--link", is_flag=True, help="Hard-link the base's safetensors shards instead of copying them.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a folder pesc wrote (never another).")
def import_loramoe(adapter_dir, out, base, link, force):
    """An adapter saved by the official LoRAMoE code (adapter_config.json + adapter_model.bin) on BASE as a pesc
    LoRAMoE checkpoint at OUT: computes what the official code computes, trains, exports and serves with pesc."""
    from pesc.methods.loramoe.official_import import import_loramoe as run_import

    run_import(adapter_dir, out, base, link=link, force=force, echo=click.echo)
