"""The `finetune` command. Verbs are thin: they load the recipe, call one stage, and turn our errors into
one-line messages with a non-zero exit code (never a traceback for a user mistake)."""

from __future__ import annotations

import functools
import os
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
    """Print a `UserError` as clean lines on stderr (exit 2); anything unexpected as one line plus where its
    traceback went (exit 1). A traceback box is for developers: FINETUNE_DEBUG=1 prints it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from finetune.errors import TrainingInterrupted, UserError

        try:
            return fn(*args, **kwargs)
        except TrainingInterrupted as e:  # SIGTERM/SIGINT after a clean checkpoint: not a failure
            typer.echo(f"interrupted: {e}")
            raise typer.Exit(0) from None
        except UserError as e:
            for line in e.lines():
                typer.echo(line, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence: one line, the traceback kept
            if os.environ.get("FINETUNE_DEBUG"):
                raise
            where = _keep_traceback()
            typer.echo(f"internal error: {type(e).__name__}: {_one_line(e)} (full traceback: {where}; "
                       "FINETUNE_DEBUG=1 prints it)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _keep_traceback() -> str:
    """Write the current exception's traceback to the run's log when one is open, else to a temp file."""
    import logging
    import tempfile
    import traceback

    from finetune.rundir import own_log_files

    text = traceback.format_exc()
    logger = logging.getLogger("finetune")
    files = own_log_files()
    for h in files:
        h.handle(logger.makeRecord("finetune", logging.ERROR, __file__, 0, "unexpected error:\n%s", (text,), None))
        h.flush()
    if files:
        return files[0].baseFilename
    fd, path = tempfile.mkstemp(prefix="finetune-traceback-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


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


@app.command()
@user_errors
def plan(recipe: Path = typer.Argument(..., help="Recipe YAML."),
         overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. lora.r=64."),
         gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU, e.g. 24GiB, 80GB "
                                                  "(default: the visible GPU's, else 24GiB)."),
         seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: data.max_length)."),
         batch: Optional[int] = typer.Option(None, "--batch", help="Micro-batch per GPU (default: train.micro_batch_size)."),
         num_processes: int = typer.Option(1, "--num-processes", help="GPUs / processes (accelerate launch)."),
         sharding: Optional[str] = typer.Option(None, "--sharding", help="none | ddp | fsdp | fsdp_offload | zero3 | "
                                                "zero3_offload (default: ddp when --num-processes > 1)."),
         accelerate_config: Optional[Path] = typer.Option(None, "--accelerate-config", help="Take --num-processes and "
                                                          "--sharding from an accelerate config file."),
         shape: Optional[str] = typer.Option(None, "--shape", help="Use a built-in shape (e.g. llama-2-7b) instead of "
                                             "model.base."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")):
    """Estimate peak GPU memory before downloading anything; exit 1 if it does not fit."""
    import json as _json

    from finetune.plan import GIB, parse_size, plan_recipe, read_accelerate_config, render

    r = load_recipe(recipe, overrides or [])
    if accelerate_config is not None:
        num_processes, from_cfg = read_accelerate_config(accelerate_config)
        sharding = sharding or from_cfg
    import torch

    gpu = torch.cuda.is_available()
    if gpu_memory is not None:
        mem = parse_size(gpu_memory)
    else:
        mem = torch.cuda.get_device_properties(0).total_memory if gpu else 24 * GIB
    # The visible GPU's precision (a T4/V100 computes in fp32); without a GPU, plan for one with bf16.
    bf16 = torch.cuda.is_bf16_supported() if gpu else True
    p = plan_recipe(r, mem, seq_len=seq_len, batch=batch, num_processes=num_processes, sharding=sharding,
                    shape=shape, bf16=bf16)
    typer.echo(_json.dumps(p.to_dict(), indent=2) if as_json else render(p))
    if not p.fits:
        raise typer.Exit(1)


@app.command(epilog=_recipe_help())
@user_errors
def train(recipe: Path = typer.Argument(..., help="Recipe YAML."),
          overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. lora.r=8 train.max_steps=20."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint."),
          force: bool = typer.Option(False, "--force", help="With --resume: continue even though the recipe or data "
                                                            "changed since the checkpoint was written.")):
    """Fine-tune: 4-bit base + LoRA with TRL's SFTTrainer; writes OUTPUT_DIR/adapter."""
    from finetune import distributed
    from finetune.rundir import is_main_process
    from finetune.train import train as run_train

    r = load_recipe(recipe, overrides or [])
    ranks = distributed.requested_cpu_processes()
    if ranks:  # `accelerate launch --cpu --num_processes N` started only this one process
        raise typer.Exit(distributed.relaunch_cpu_ranks(ranks))
    run = run_train(r, recipe, resume=resume, force=force, overrides=overrides or [])
    if is_main_process():
        typer.echo(f"done: {run / 'adapter'}  (report: {run / 'report.md'})")


@app.command(epilog=_recipe_help())
@user_errors
def data(recipe: Path = typer.Argument(..., help="Recipe YAML."),
         overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides."),
         color: Optional[bool] = typer.Option(None, "--color/--no-color", help="Highlight supervised spans in colour "
                                              "(default: when printing to a terminal; [[...]] markers otherwise)."),
         examples: int = typer.Option(2, help="Rendered examples to show.")):
    """Show what training will see (rows, lengths, masks, packing) and write OUTPUT_DIR/data_report.json."""
    from finetune import data as data_mod
    from finetune import rundir
    from finetune.data_view import format_report
    from finetune.train import load_tokenizer_and_template

    r = load_recipe(recipe, overrides or [])
    rundir.setup_logging()
    _, tok, template = load_tokenizer_and_template(r)
    prepared = data_mod.prepare_for(r, tok, template)
    prepared.report["steps"] = data_mod.shape_for_method(r, prepared.train).to_dict()
    out = Path(r.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / "data_report.json", prepared.report)
    data_mod.write_held_out_for(r, out / "held_out.jsonl", prepared.held_out)
    typer.echo(f"template: {template.name}\n" + format_report(prepared.report, color=color, examples=examples))
    typer.echo(f"report: {out / 'data_report.json'}")


@app.command("eval")
@user_errors
def eval_cmd(run_dir: Path = typer.Argument(..., help="Run directory (the recipe's output_dir)."),
             limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N rows of each task "
                                                 "(a quick check)."),
             model: Optional[str] = typer.Option(None, "--model", help="Fine-tuned model to compare with the base: "
                                                 "adapter | merged | both (default: the recipe's eval.model).")):
    """Evaluate base vs fine-tuned on the recipe's eval tasks; writes RUN_DIR/eval/ (results.json, report.md)."""
    from finetune.evaluate import evaluate_run

    results = evaluate_run(run_dir, limit=limit, model=model, echo=lambda m: typer.echo(m, err=True))
    typer.echo((results.parent / "table.md").read_text(encoding="utf-8"))
    typer.echo(f"report: {results.parent / 'report.md'}")


@app.command("run", epilog=_recipe_help())
@user_errors
def run_cmd(recipe: Path = typer.Argument(..., help="Recipe YAML."),
            overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. train.max_steps=20.")):
    """Train, merge, evaluate and export in one go. A stage whose output is complete and up to date is
    skipped, so re-running after a crash continues where it stopped."""
    from finetune.pipeline import run_pipeline

    r = load_recipe(recipe, overrides or [])
    run_dir, _ = run_pipeline(r, recipe, overrides or [], echo=lambda m: typer.echo(m, err=True))
    table = run_dir / "eval" / "table.md"
    if table.is_file():
        typer.echo(table.read_text(encoding="utf-8"))
    typer.echo(f"report: {run_dir / 'report.md'}")


def _reply(model, ctx, messages, max_new_tokens: int, temperature: float):
    from finetune.data import prompt_ids
    from finetune.evaluate.generation import stream_reply

    def out(text: str):
        sys.stdout.write(text)
        sys.stdout.flush()

    gen = stream_reply(model, ctx.tok, prompt_ids(messages, ctx.tok, ctx.template), ctx.stops, max_new_tokens,
                       out, temperature)
    sys.stdout.write("\n")
    if not gen.stopped:
        typer.echo(f"[stopped at --max-new-tokens {max_new_tokens} without the end token]", err=True)
    return gen


_MODEL_HELP = "adapter (on its 4-bit base), merged, or base (the 4-bit base alone)."
# generate and chat take the same options.
_MODEL_OPT = typer.Option("adapter", "--model", help=_MODEL_HELP)
_SYSTEM_OPT = typer.Option(None, "--system", help="System message (default: the recipe's data.system_prompt).")
_MAX_NEW_OPT = typer.Option(256, "--max-new-tokens", min=1)
_TEMPERATURE_OPT = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy.")


def _open_for_chat(run_dir: Path, model: str, system: Optional[str]):
    """(run context, model, opening messages): the system message defaults to the recipe's, as in training."""
    from finetune.evaluate.loading import load_for_inference

    ctx, m = load_for_inference(run_dir, model)
    system = system if system is not None else ctx.recipe.data.system_prompt
    return ctx, m, [{"role": "system", "content": system}] if system else []


@app.command()
@user_errors
def generate(run_dir: Path = typer.Argument(..., help="Run directory."),
             prompt: str = typer.Option(..., "--prompt", "-p", help="The user message."),
             model: str = _MODEL_OPT, system: Optional[str] = _SYSTEM_OPT,
             max_new_tokens: int = _MAX_NEW_OPT, temperature: float = _TEMPERATURE_OPT):
    """Answer one prompt with the run's template and stop tokens, streaming tokens as they come."""
    from finetune.evaluate.loading import as_model

    ctx, m, start = _open_for_chat(run_dir, model, system)
    messages = start + [{"role": "user", "content": prompt}]
    with as_model(m, model):
        _reply(m, ctx, messages, max_new_tokens, temperature)


@app.command()
@user_errors
def chat(run_dir: Path = typer.Argument(..., help="Run directory."),
         model: str = _MODEL_OPT, system: Optional[str] = _SYSTEM_OPT,
         max_new_tokens: int = _MAX_NEW_OPT, temperature: float = _TEMPERATURE_OPT):
    """Chat with the fine-tuned model in the terminal (/reset clears the history, /exit or Ctrl-D quits)."""
    from finetune.evaluate.loading import as_model

    ctx, m, start = _open_for_chat(run_dir, model, system)
    history = list(start)
    typer.echo(f"chatting with {run_dir} ({model}); /reset clears the history, /exit quits", err=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            typer.echo("", err=True)
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        with as_model(m, model):
            gen = _reply(m, ctx, history, max_new_tokens, temperature)
        history.append({"role": "assistant", "content": gen.text})


@app.command()
@user_errors
def merge(run_dir: Path = typer.Argument(..., help="Run directory (the recipe's output_dir)."),
          base: str = typer.Option("dequantized", "--base", help="dequantized: merge into dequant(NF4(W)), what the "
                                   "adapter was trained on. original: merge into the 16-bit W (drifts; measured).")):
    """Merge the adapter into a standalone model (RUN_DIR/merged) and report its fidelity to the adapter."""
    from finetune.merge import merge_run

    out = merge_run(run_dir, base=base)
    typer.echo(f"merged: {out}  (fidelity: {out / 'fidelity.json'})")


@app.command(context_settings={"allow_extra_args": True})
@user_errors
def export(ctx: typer.Context,
           run_dir: Path = typer.Argument(..., help="Run directory (the recipe's output_dir)."),
           formats: List[str] = typer.Option(..., "--format", help="hf, adapter, gguf, gguf_adapter, ollama; several "
                                             "may follow one --format (--format gguf ollama adapter)."),
           gguf_type: Optional[List[str]] = typer.Option(None, "--gguf-type", help="One or several GGUF types "
                                               "(--gguf-type f16 q8_0 q6_k q5_k_m q4_k_m): f32/f16/bf16 written in "
                                               "Python, the others (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q3_k_m, q2_k, "
                                               "...) by llama.cpp's quantizer from the f16 file (default f16); the first is the "
                                               "Modelfile's. With --verify: the fidelity ladder of every type."),
           verify: bool = typer.Option(False, "--verify", help="Check the GGUF against HF in llama.cpp "
                                       "(llama-cpp-python): tokenisation and logits; writes export/verify.json."),
           push: Optional[str] = typer.Option(None, "--push", help="Push the merged model (--format hf) to this "
                                              "hub repo.")):
    """Export the run: merged HF model, PEFT adapter, GGUF (pure Python) and an Ollama Modelfile.
    Merges first when merged/ is missing or older than the adapter."""
    from finetune import rundir
    from finetune.export import NEEDS_MERGED, export_run, gguf_types, normalize_formats
    from finetune.merge import merge_run

    fmts, types = _split_format_and_types(formats, gguf_type, list(ctx.args))
    wanted = normalize_formats(fmts, verify)
    types = gguf_types(types)
    if any(f in NEEDS_MERGED for f in wanted) and not rundir.merged_complete(run_dir):
        typer.echo("merged/ is missing or older than the adapter: merging first", err=True)
        merge_run(run_dir)
    results = export_run(run_dir, wanted, gguf_type=types, verify=verify, push=push,
                         task=_ladder_task(run_dir) if verify else None)
    for fmt in wanted:
        val = results[fmt]
        typer.echo(f"{fmt}: {val['lora']} on {val['base']}" if fmt == "gguf_adapter" else f"{fmt}: {val}")
    if verify and not results["verify"]["passed"]:
        raise typer.Exit(1)


def _split_format_and_types(formats: List[str], types: List[str], extra: List[str]) -> tuple[list, list]:
    """Click gives each option one value; the words after it arrive as extra arguments in one list. Format names
    and GGUF type names do not overlap, so each extra word goes where its name belongs."""
    from finetune.export import FORMATS
    from finetune.export.quantize import ALL_TYPES

    fmts, tys = _split_formats(formats), _split_formats(types or [])
    for word in _split_formats(extra):
        if word in FORMATS:
            fmts.append(word)
        elif word in ALL_TYPES:
            tys.append(word)
        else:
            from finetune.errors import UserError

            raise UserError(f"export: unexpected argument {word!r}; formats are {', '.join(FORMATS)} and GGUF types "
                            f"{', '.join(ALL_TYPES)}")
    return fmts, tys or ["f16"]


def _ladder_task(run_dir: Path):
    """The held-out generation task export's fidelity ladder scores (eval's tasks and metrics)."""
    from finetune.evaluate.export_task import ladder_task
    from finetune.recipe import load_resolved

    return ladder_task(run_dir, load_resolved(Path(run_dir) / "resolved.yaml"))


def _split_formats(formats: List[str]) -> List[str]:
    """`--format gguf ollama` arrives as one option value plus extra arguments (click options take one value
    each); commas and spaces inside a value work too."""
    out = []
    for f in formats:
        out += [x for x in f.replace(",", " ").split() if x]
    return out


def run() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(run())
