"""The `finetune` command. Verbs are thin: they load the recipe, call one stage, and turn our errors into
one-line messages with a non-zero exit code (never a traceback for a user mistake)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from finetune import __version__
from finetune.recipe import RecipeError, field_docs, load_recipe


def _recipe_help() -> str:
    rows = field_docs()
    width = max(len(k) for k, _, _ in rows)
    body = "\n".join(f"  {k.ljust(width)}  {d}" + (f" [default: {v}]" if v and v not in ("[]",) else "")
                     for k, v, d in rows)
    # Typer/rich reflows help text unless blocks are marked verbatim with \b.
    return "Recipe keys (YAML, or KEY=VALUE overrides):\n\n\b\n" + body


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Parameter-efficient fine-tuning for LLaMA-family models: what you train is what you ship.")


def _version(value: bool):
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    pass


def user_errors(fn):
    """Print our known error types as clean lines on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from finetune.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except RecipeError as e:
            for line in e.problems:
                typer.echo(line, err=True)
            raise typer.Exit(2) from None
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command(epilog=_recipe_help())
@user_errors
def validate(recipes: List[Path] = typer.Argument(..., help="Recipe YAML files to check."),
             override: List[str] = typer.Option([], "--set", help="KEY=VALUE override applied to each recipe.")):
    """Check recipes without loading any model; print every problem, one per line."""
    bad = []
    for path in recipes:
        try:
            load_recipe(path, override)
            typer.echo(f"{path}: ok")
        except RecipeError as e:
            bad.extend(e.problems)
    for line in bad:
        typer.echo(line, err=True)
    if bad:
        raise typer.Exit(2)


@app.command(epilog=_recipe_help())
@user_errors
def train(recipe: Path = typer.Argument(..., help="Recipe YAML."),
          overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. lora.r=8 train.max_steps=20."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint.")):
    """Fine-tune: 4-bit base + LoRA with TRL's SFTTrainer; writes OUTPUT_DIR/adapter."""
    from finetune.train import train as run_train

    r = load_recipe(recipe, overrides or [])
    run = run_train(r, recipe, resume=resume)
    typer.echo(f"done: {run / 'adapter'}  (report: {run / 'report.md'})")


def run() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(run())
