"""The `latentmem` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Memory inside a transformer language model (MemoryLLM).", no_args_is_help=True)
memory_app = typer.Typer(help="Inspect saved memory states.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@app.command()
def demo(distractors: int = typer.Option(40, min=1, help="Unrelated writes after the story.")) -> None:
    """Write a story into memory, bury it under distractors, read, save and reload the memory."""
    from .demo import run_demo

    run_demo(distractors=distractors, echo=typer.echo)


@memory_app.command("info")
def memory_info(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A saved memory file.")) -> None:
    """Print a memory file's manifest (shape, writes, injections) without loading its tensors."""
    from .persistence import read_manifest

    manifest = read_manifest(path)
    manifest.pop("generator_state")
    typer.echo(json.dumps(manifest, indent=2))
