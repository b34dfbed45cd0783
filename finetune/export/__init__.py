"""`finetune export`: the merged model and the adapter in the formats people serve them with.

    RUN/export/hf/                 the merged model (hard links to merged/), pushed with --push REPO
    RUN/export/adapter/            the PEFT adapter, adapter_config.json naming the base (vLLM, TGI, PEFT)
    RUN/export/gguf/NAME-TYPE.gguf llama.cpp, written in pure Python
    RUN/export/gguf/Modelfile      Ollama, beside the GGUF
    RUN/export/verify.json         llama.cpp vs HF (--verify)
    RUN/export/export.json         what was exported from which merge (for export_complete)

Export reads merged/ but never merges: the CLI (or `finetune run`) runs `finetune merge` first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from finetune import rundir
from finetune.errors import UserError
from finetune.recipe import load_resolved
from finetune.report import write_report
from finetune.templates import ChatTemplate, saved_template

log = logging.getLogger("finetune")

FORMATS = ("hf", "adapter", "gguf", "ollama")
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
    return rundir.adapter_sha(run) if fmt == "adapter" else rundir.merged_token(run)


def export_complete(run: Path, formats: list[str], gguf_type: str = "f16") -> bool:
    """Every format was exported from the current merge/adapter, with this GGUF type, and its files exist."""
    run = Path(run)
    path = run / "export" / "export.json"
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text(encoding="utf-8")).get("formats", {})
        wanted = normalize_formats(list(formats))
    except (ValueError, ExportError):
        return False
    for fmt in wanted:
        entry = done.get(fmt)
        if not entry or entry.get("source") != _source_token(run, fmt):
            return False
        if fmt in ("gguf", "ollama") and entry.get("gguf_type") != gguf_type:
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


def export_run(run: Path, formats: list[str], gguf_type: str = "f16", verify: bool = False,
               push: str | None = None) -> dict:
    """Export the run in each format; returns {format: path} (and "verify": the result dict when asked)."""
    from transformers import AutoTokenizer

    run = Path(run)
    formats = _check_request(run, formats, gguf_type, verify, push)
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
    gguf_path = out / "gguf" / f"{name}-{gguf_type}.gguf"
    if "gguf" in formats:
        results["gguf"] = _export_gguf(run, gguf_path, gguf_type, tok, template, name, done)
    if "ollama" in formats:
        results["ollama"] = _export_ollama(run, gguf_path, gguf_type, tok, template, recipe, name, done)
    if verify:
        results["verify"] = _verify(run, gguf_path, gguf_type, tok, template)
    rundir.write_json(record_path, record)
    rundir.add_event(run, "export", formats=",".join(formats), gguf_type=gguf_type, verify=verify)
    write_report(run)
    return results


def _rel(run: Path, p: Path) -> str:
    return str(p.relative_to(run))


def _check_request(run: Path, formats: list[str], gguf_type: str, verify: bool, push: str | None) -> list[str]:
    """The formats to write (normalised), after every check that needs no model loaded."""
    from finetune.export.gguf import GGUF_TYPES

    formats = normalize_formats(list(formats), verify)
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type: must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})")
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


def _export_gguf(run: Path, gguf_path: Path, gguf_type: str, tok, template: ChatTemplate, name: str,
                 done: dict) -> Path:
    from finetune.export.gguf import GGUFExportError, write_gguf

    try:
        res = write_gguf(run / "merged", gguf_path, gguf_type, chat_template=template.source,
                         end_token=template.end_token(tok), name=name)
    except GGUFExportError as e:
        raise ExportError(str(e)) from None
    done["gguf"] = {"source": rundir.merged_token(run), "gguf_type": gguf_type, "files": [_rel(run, gguf_path)],
                    "fallbacks": res.fallbacks}
    log.info("gguf: wrote %s (%d tensors, %s%s)", gguf_path, res.tensors, gguf_type,
             f"; {len(res.fallbacks)} tensors fell back to f16" if res.fallbacks else "")
    return gguf_path


def _export_ollama(run: Path, gguf_path: Path, gguf_type: str, tok, template: ChatTemplate, recipe, name: str,
                   done: dict) -> Path:
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
    mf = gguf_path.parent / "Modelfile"
    mf.write_text(modelfile(gguf_path.name, go, template.stop_tokens(tok), recipe.data.system_prompt, name, note),
                  encoding="utf-8")
    done["ollama"] = {"source": rundir.merged_token(run), "gguf_type": gguf_type,
                      "files": [_rel(run, mf), _rel(run, gguf_path)], "template_translated": go is not None}
    print(f"ollama: cd {mf.parent} && ollama create {name} -f Modelfile && ollama run {name}", flush=True)
    return mf


def _verify(run: Path, gguf_path: Path, gguf_type: str, tok, template: ChatTemplate) -> dict:
    """--verify: llama.cpp (in a child process) against HF; verify.json holds the result, crashes included."""
    from finetune.export.verify import VerifyUnavailable, verify_gguf

    seqs, texts = _probes_for_verify(run, tok, template)
    try:
        result = verify_gguf(gguf_path, run / "merged", gguf_type, seqs, texts)
    except VerifyUnavailable as e:
        raise ExportError(str(e)) from None
    rundir.write_json(run / "export" / "verify.json", result)
    print(result["summary"], flush=True)
    return result
