"""`finetune export`: the merged model and the adapter in the formats people serve them with.

    RUN/export/hf/                 the merged model (hard links to merged/), pushed with --push REPO
    RUN/export/adapter/            the PEFT adapter, adapter_config.json naming the base (vLLM, TGI, PEFT)
    RUN/export/gguf/NAME-TYPE.gguf llama.cpp: f32/f16/bf16 written in pure Python, every other type (q8_0,
                                   q4_k_m, ...) made from the f16 one by llama.cpp's own quantizer
    RUN/export/gguf/NAME-base-TYPE.gguf + NAME-lora.gguf
                                   the base training computed with + the LoRA adapter in llama.cpp's layout
    RUN/export/gguf/Modelfile      Ollama, beside the GGUF (Modelfile.adapter: FROM base + ADAPTER)
    RUN/export/verify.json         llama.cpp vs HF (--verify), with the fidelity ladder of every type
    RUN/export/export.json         what was exported from which merge (for export_complete)

Export reads merged/ but never merges: the CLI (or `finetune run`) runs `finetune merge` first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from finetune import rundir
from finetune.errors import UserError
from finetune.recipe import load_resolved
from finetune.report import write_report
from finetune.templates import ChatTemplate, saved_template

log = logging.getLogger("finetune")

FORMATS = ("hf", "adapter", "gguf", "gguf_adapter", "ollama")
NEEDS_MERGED = ("hf", "gguf", "ollama")


class ExportError(UserError):
    """An export that cannot be done as asked; the message says why and what to do."""


def normalize_formats(formats: list[str], verify: bool = False) -> list[str]:
    """Validate the names; ollama and --verify need the GGUF, so they bring it along."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"--format: unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    if not formats:
        raise ExportError(f"--format: give at least one of {', '.join(FORMATS)}")
    wanted = set(formats) | ({"gguf"} if verify or "ollama" in formats else set())
    return [f for f in FORMATS if f in wanted]


def _source_token(run: Path, fmt: str) -> str | None:
    # What the export was made from, as the run directory records it (its merge marker, or the adapter's hash).
    return rundir.adapter_sha(run) if fmt in ("adapter", "gguf_adapter") else rundir.merged_token(run)


def gguf_types(gguf_type: str | list[str]) -> list[str]:
    """One type or several (a recipe's single string stays valid); unknown ones are one line listing the valid."""
    from finetune.export.quantize import check_types

    try:
        return check_types([gguf_type] if isinstance(gguf_type, str) else list(gguf_type))
    except ValueError as e:
        raise ExportError(str(e)) from None


def export_complete(run: Path, formats: list[str], gguf_type: str | list[str] = "f16") -> bool:
    """Every format was exported from the current merge/adapter, with these GGUF types, and its files exist."""
    run = Path(run)
    path = run / "export" / "export.json"
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text(encoding="utf-8")).get("formats", {})
        wanted = normalize_formats(list(formats))
        types = gguf_types(gguf_type)
    except (ValueError, ExportError):
        return False
    for fmt in wanted:
        entry = done.get(fmt)
        if not entry or entry.get("source") != _source_token(run, fmt):
            return False
        if fmt == "gguf" and not set(types) <= set(entry.get("gguf_types") or [entry.get("gguf_type")]):
            return False
        if fmt == "ollama" and entry.get("gguf_type") != types[0]:
            return False
        if not all((run / p).exists() for p in entry.get("files", [])):
            return False
    return True


# ---------------------------------------------------------------------------------------------


def _link_tree(src: Path, dst: Path) -> list[str]:
    """Hard-link (or copy, across file systems) every file of src into dst: no second copy on disk."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    names = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
            names.append(f.name)
    return names


def export_adapter(run: Path, out: Path) -> Path:
    """The PEFT adapter in the layout vLLM/TGI/PEFT load, with adapter_config.json naming the base."""
    manifest = rundir.read_manifest(run)
    base = manifest.get("base") or {}
    _link_tree(run / "adapter", out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    spec = base.get("spec", "")
    # A hub id or a local HF directory names itself; a GGUF/builtin base was trained from its dequantised HF copy.
    local = Path(spec).expanduser()
    if base.get("gguf_file") or not spec:
        name = base.get("hf_path") or cfg.get("base_model_name_or_path")
    elif local.is_dir():
        name = str(local.resolve())
    else:
        name = spec
    cfg["base_model_name_or_path"] = name
    cfg_path.unlink()  # it is a hard link into adapter/: write a new file, never through the link
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


def push_to_hub(folder: Path, repo: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ExportError(f"--push {repo}: the hub is not reachable here (HF_HUB_OFFLINE is set); "
                          f"push later with `huggingface-cli upload {repo} {folder}`")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as e:  # network, auth and permission errors all end the same way for the user
        raise ExportError(f"--push {repo}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                          f"(log in with `huggingface-cli login`, check the repo name, or push later)") from None
    return str(getattr(info, "commit_url", repo))


def _probes_for_verify(run: Path, tok, template: ChatTemplate, limit: int = 8, max_tokens: int = 96):
    """Token sequences (held-out conversations, else built-in prompts) and their texts."""
    from finetune.data import render_ids_and_mask

    rows = []
    held = run / "held_out.jsonl"
    if held.is_file():
        rows = [json.loads(line) for line in held.read_text(encoding="utf-8").splitlines() if line.strip()]
    convs = [r["messages"] for r in rows if r.get("messages")][:limit]
    if not convs:
        convs = [[{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}],
                 [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hi 😀"},
                  {"role": "assistant", "content": "Hi! 👋"}]]
    seqs = [render_ids_and_mask(c, tok, template)[0][:max_tokens] for c in convs]
    texts = [tok.apply_chat_template(c, chat_template=template.source, tokenize=False) for c in convs]
    return seqs, texts


def export_run(run: Path, formats: list[str], gguf_type: str | list[str] = "f16", verify: bool = False,
               push: str | None = None, task: dict | None = None) -> dict:
    """Export the run in each format; returns {format: path} (and "verify": the result dict when asked).

    `gguf_type`: one type or several (f16 q8_0 q4_k_m ...). `task`: the held-out generation task the fidelity
    ladder scores (built by finetune.evaluate.export_task.ladder_task; without it the ladder has no task column).
    """
    from transformers import AutoTokenizer

    run = Path(run)
    formats = _check_request(run, formats, gguf_type, verify, push)
    types = gguf_types(gguf_type)
    rundir.setup_logging(run, "export.log")
    recipe = load_resolved(run / "resolved.yaml")
    out = run / "export"
    out.mkdir(exist_ok=True)
    record_path = out / "export.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    done = record.setdefault("formats", {})
    results: dict = {}
    name = run.resolve().name or "model"

    if "hf" in formats:
        _export_hf(run, out / "hf", push, results, done)
    if "adapter" in formats:
        results["adapter"] = export_adapter(run, out / "adapter")
        done["adapter"] = {"source": rundir.adapter_sha(run), "files": [_rel(run, out / "adapter" / "adapter_config.json")]}

    merged = run / "merged"
    tok = AutoTokenizer.from_pretrained(merged if merged.is_dir() else run / "adapter")
    template = saved_template(recipe.data.template, tok)
    paths = _gguf_paths(out / "gguf", name, types)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as work:
        if "gguf" in formats:
            results["gguf"] = _export_gguf(run, paths, types, tok, template, name, done)
            results["gguf_files"] = {t: paths[t] for t in types}
        if "gguf_adapter" in formats:
            results["gguf_adapter"] = _export_gguf_adapter(run, out / "gguf", types, tok, template, recipe, name,
                                                           Path(work), done)
        if "ollama" in formats:
            results["ollama"] = _export_ollama(run, paths[types[0]], types[0], tok, template, recipe, name, done)
        if verify:
            results["verify"] = _verify(run, paths, types, tok, template, task, results.get("gguf_adapter"))
    _drop_unrequested_source(paths, types, done)
    rundir.write_json(record_path, record)
    rundir.add_event(run, "export", formats=",".join(formats), gguf_type=",".join(types), verify=verify)
    write_report(run)
    return results


def _gguf_paths(folder: Path, name: str, types: list[str]) -> dict[str, Path]:
    """Where each type goes, the quantizer's source (f16, or f32) included even when it was not asked for."""
    from finetune.export.quantize import source_type

    return {t: folder / f"{name}-{t}.gguf" for t in dict.fromkeys(types + [source_type(types)])}


def _drop_unrequested_source(paths: dict[str, Path], types: list[str], done: dict) -> None:
    # The f16 the quantizer (and --verify's tokenisation check) read from goes when it was not asked for.
    for t, p in paths.items():
        if t not in types and p.exists():
            p.unlink()


def _rel(run: Path, p: Path) -> str:
    return str(p.relative_to(run))


def _check_request(run: Path, formats: list[str], gguf_type, verify: bool, push: str | None) -> list[str]:
    """The formats to write (normalised), after every check that needs no model loaded."""
    formats = normalize_formats(list(formats), verify)
    types = gguf_types(gguf_type)
    if any(t not in ("f32", "f16", "bf16") for t in types) and "gguf" in formats:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise ExportError(f"--gguf-type {' '.join(types)}: quantized types are made by llama.cpp's quantizer; "
                              "pip install llama-cpp-python (or ask for f16/f32/bf16 only)")
    if push and "hf" not in formats:
        raise ExportError("--push: add --format hf (the merged model is what gets pushed)")
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ExportError(f"{run / 'adapter'}: no finished adapter here; run `finetune train` first")
    rundir.check_adapter(run)  # a damaged adapter file: one line naming it
    if any(f in NEEDS_MERGED for f in formats) and rundir.merged_token(run) is None:
        raise ExportError(f"{run / 'merged'}: no finished merge; run `finetune merge {run}` first")
    return formats


def _export_hf(run: Path, dst: Path, push: str | None, results: dict, done: dict) -> None:
    files = _link_tree(run / "merged", dst)
    results["hf"] = dst
    done["hf"] = {"source": rundir.merged_token(run), "files": [_rel(run, dst / f) for f in files]}
    if push:
        results["push"] = push_to_hub(dst, push)
        done["hf"]["pushed_to"] = push


def _export_gguf(run: Path, paths: dict[str, Path], types: list[str], tok, template: ChatTemplate, name: str,
                 done: dict) -> Path:
    """Our writer for f32/f16/bf16 (and the quantizer's source), llama.cpp's quantizer for every other type.
    Returns the first requested type's path."""
    from finetune.export.gguf import GGUFExportError, write_gguf
    from finetune.export.quantize import WRITER_TYPES, QuantizeError, quantize_gguf, source_type

    src = source_type(types)
    made, fallbacks = {}, []
    for t in [t for t in paths if t in WRITER_TYPES]:
        try:
            res = write_gguf(run / "merged", paths[t], t, chat_template=template.source,
                             end_token=template.end_token(tok), name=name)
        except GGUFExportError as e:
            raise ExportError(str(e)) from None
        fallbacks += res.fallbacks
        made[t] = {"by": "finetune's GGUF writer"}
        log.info("gguf: wrote %s (%d tensors, %s)", paths[t], res.tensors, t)
    for t in [t for t in types if t not in WRITER_TYPES]:
        try:
            info = quantize_gguf(paths[src], paths[t], t)
        except QuantizeError as e:
            raise ExportError(str(e)) from None
        made[t] = {"by": f"llama.cpp's quantizer from {paths[src].name}", **info}
        log.info("gguf: llama.cpp quantized %s -> %s (%.1fs; the child's RSS rose by %.0f MiB while quantizing a "
                 "%.0f MiB file)", paths[src].name, paths[t].name, info["seconds"],
                 (info["peak_rss_bytes"] - info["rss_before_bytes"]) / 2**20, info["input_bytes"] / 2**20)
    done["gguf"] = {"source": rundir.merged_token(run), "gguf_type": types[0], "gguf_types": types,
                    "files": [_rel(run, paths[t]) for t in types], "fallbacks": fallbacks,
                    "made": {t: made[t] for t in types}}
    return paths[types[0]]


def _export_gguf_adapter(run: Path, folder: Path, types: list[str], tok, template: ChatTemplate, recipe, name: str,
                         work: Path, done: dict) -> dict:
    """NAME-lora.gguf (llama.cpp's LoRA layout) + NAME-base-TYPE.gguf (the base training computed with, in the
    first of f16/f32/bf16 asked, else f16) + Modelfile.adapter. Returns their paths and the dense base's HF
    directory (kept in `work` for --verify)."""
    from finetune.export.adapter_gguf import AdapterGGUFError, dense_base_dir, write_adapter_gguf
    from finetune.export.gguf import GGUFExportError, write_gguf

    btype = next((t for t in types if t in ("f16", "f32", "bf16")), "f16")
    try:
        base_dir = dense_base_dir(run, tok, work)
        base = write_gguf(base_dir, folder / f"{name}-base-{btype}.gguf", btype, chat_template=template.source,
                          end_token=template.end_token(tok), name=f"{name}-base").path
        lora = write_adapter_gguf(run / "adapter", base_dir, folder / f"{name}-lora.gguf", name=name)
    except (AdapterGGUFError, GGUFExportError) as e:
        raise ExportError(str(e)) from None
    mf = _write_modelfile(folder / "Modelfile.adapter", base.name, tok, template, recipe, name, adapter=lora.path.name)
    done["gguf_adapter"] = {"source": rundir.adapter_sha(run), "base_type": btype, "alpha": lora.alpha,
                            "pairs": lora.pairs, "scale_folded_into_b": lora.folded,
                            "files": [_rel(run, base), _rel(run, lora.path), _rel(run, mf)]}
    log.info("gguf_adapter: %s (%d LoRA pairs, alpha %g) on %s", lora.path.name, lora.pairs, lora.alpha, base.name)
    return {"base": base, "lora": lora.path, "modelfile": mf, "base_dir": base_dir, "adapter_dir": run / "adapter"}


def _export_ollama(run: Path, gguf_path: Path, gguf_type: str, tok, template: ChatTemplate, recipe, name: str,
                   done: dict) -> Path:
    mf = _write_modelfile(gguf_path.parent / "Modelfile", gguf_path.name, tok, template, recipe, name)
    done["ollama"] = {"source": rundir.merged_token(run), "gguf_type": gguf_type,
                      "files": [_rel(run, mf), _rel(run, gguf_path)],
                      "template_translated": "TEMPLATE" in mf.read_text(encoding="utf-8")}
    print(f"ollama: cd {mf.parent} && ollama create {name} -f Modelfile && ollama run {name}", flush=True)
    return mf


def _write_modelfile(mf: Path, gguf_name: str, tok, template: ChatTemplate, recipe, name: str,
                     adapter: str | None = None) -> Path:
    from finetune.export.ollama import TemplateTranslationError, modelfile, translate

    def render(messages, gen):
        return tok.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                       add_generation_prompt=gen)
    try:
        go, note = translate(render), None
    except TemplateTranslationError as e:
        go, note = None, str(e)
        log.warning("ollama: the chat template could not be translated (%s); the Modelfile has no TEMPLATE, "
                    "so Ollama would use its default. Write one by hand before `ollama create`.", e)
    mf.parent.mkdir(parents=True, exist_ok=True)
    mf.write_text(modelfile(gguf_name, go, template.stop_tokens(tok), recipe.data.system_prompt, name, note,
                            adapter=adapter), encoding="utf-8")
    return mf


def _verify(run: Path, paths: dict[str, Path], types: list[str], tok, template: ChatTemplate, task: dict | None,
            adapter: dict | None) -> dict:
    """--verify: llama.cpp (in child processes) against HF. The tokenisation and tight logit check on the
    writer's GGUF (f16/f32), then the fidelity ladder of every type (and of base + LoRA GGUF); verify.json holds
    it all, crashes included."""
    from finetune.export.fidelity import build_ladder, ladder_lines, ladder_table
    from finetune.export.quantize import WRITER_TYPES, source_type
    from finetune.export.verify import VerifyUnavailable, verify_gguf

    first = next((t for t in types if t in WRITER_TYPES), source_type(types))
    seqs, texts = _probes_for_verify(run, tok, template)
    try:
        result = verify_gguf(paths[first], run / "merged", first, seqs, texts)
    except VerifyUnavailable as e:
        raise ExportError(str(e)) from None
    pair = (adapter["base"], adapter["lora"], adapter["base_dir"], adapter["adapter_dir"]) if adapter else None
    src = paths[source_type(types)]
    ladder = build_ladder(run / "merged", {t: paths[t] for t in types}, seqs, task, tok, template, adapter=pair,
                          f16_bytes=src.stat().st_size if src.name.endswith("-f16.gguf") else None)
    ladder["table"] = ladder_table(ladder)
    result["ladder"] = ladder
    rows_ok = all(r.get("passed") for r in ladder["rows"])
    result["passed"] = bool(result["passed"] and rows_ok)
    failed = [r["type"] for r in ladder["rows"] if not r.get("passed")]
    result["summary"] += (f"; fidelity ladder of {len(ladder['rows'])} files: "
                          + ("PASS" if rows_ok else f"FAIL ({', '.join(failed)})"))
    ladder["lines"] = ladder_lines(ladder)
    rundir.write_json(run / "export" / "verify.json", result)
    print(result["summary"], flush=True)
    print("\n".join(ladder["lines"]) + "\n\n" + ladder["table"], flush=True)
    return result
