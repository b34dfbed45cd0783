"""Check an exported GGUF in an independent runtime: llama.cpp, through the llama-cpp-python package.

Two questions, answered with numbers:
- Does llama.cpp tokenise the probe texts (special tokens, unicode, emoji) exactly as the HF tokenizer does?
- Fed the same token ids, does it compute the logits the HF merged model computes? The tight comparison is
  against HF with its weights rounded exactly as they were stored in the GGUF, so the only remaining
  difference is the runtime; the comparison with the unrounded merged model shows what the GGUF type costs.

Every llama.cpp call runs in a child process (finetune.isolate): llama.cpp can crash on a CPU it mis-detects
(llama-cpp-python 0.3.36 segfaults in `decode` on q8_0 with its AMX/repacked "extra" CPU buffers), and a crash
must be a verdict, not the end of `finetune export`. When the default path crashes, the same file is run once
more with extra buffer types off, and verify.json and the summary say both: the file may be fine, but users of
that llama.cpp build on that CPU will hit the crash.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from finetune import isolate
from finetune.export.gguf import round_trip, tensor_type

log = logging.getLogger("finetune")

RUNTIME = "llama-cpp-python"
F32_MAX_DLOGIT = 1e-3
MIN_ARGMAX = {"f32": 1.0, "f16": 0.99, "bf16": 0.99, "q8_0": 0.95}
"""Argmax agreement with HF-on-the-same-rounded-weights that --verify requires, per GGUF type."""

TOKENIZER_TEXTS = [
    "Hello world", " leading space", "trailing space ", "two  spaces\tand a tab\nand lines\n\n",
    "héllo wörld naïve café", "東京 北京 서울", "emoji 😀 🚀 👍🏽 👨‍👩‍👧", "numbers 1234567 3.14159 -42",
    'json {"name": "Ann", "age": 31}', "code: def f(x):\n    return x ** 2", "Ünïcödé ÀÉÎÕÜ ß",
]


class VerifyUnavailable(Exception):
    """llama-cpp-python is not installed."""


UNAVAILABLE = ("--verify needs llama-cpp-python: pip install llama-cpp-python "
               "(pip builds it from source once, ~7 minutes on a CPU)")


def _llama(path: Path, n_ctx: int, extra_bufts: bool = True, lora_path: str | None = None):
    try:
        import llama_cpp
        import llama_cpp.llama as llama_module
    except ImportError:
        raise VerifyUnavailable(UNAVAILABLE) from None
    # Llama() takes no use_extra_bufts argument: it builds its model params from llama_model_default_params(),
    # so that function is wrapped while this one model loads (use_extra_bufts=False turns off llama.cpp's
    # repacked CPU buffers, AMX among them).
    c_api = llama_module.llama_cpp
    default = c_api.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    c_api.llama_model_default_params = params
    try:
        # type_k/type_v 0 = GGML_TYPE_F32: an f16 KV cache alone moves the logits by ~1e-2.
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                              type_k=0, type_v=0, verbose=False, seed=0,
                              **({"lora_path": str(lora_path)} if lora_path else {}))
    finally:
        c_api.llama_model_default_params = default
    if bool(llm.model_params.use_extra_bufts) != extra_bufts:  # a llama-cpp-python that builds params elsewhere
        llm.close()
        raise RuntimeError(f"llama-cpp-python {llama_cpp.__version__}: could not set use_extra_bufts")
    return llm


def llama_side(path: str, n_ctx: int, texts: list[str], seqs: list[list[int]], extra_bufts: bool) -> dict:
    """Everything --verify asks llama.cpp, in one go (this runs in the isolated child): its tokenisation of
    `texts` (with and without BOS) and its logits on `seqs`."""
    import llama_cpp

    llm = _llama(Path(path), n_ctx, extra_bufts)
    try:
        tokens = [(text, bos, llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True))
                  for text in texts for bos in (False, True)]
        logits = llama_logits(llm, seqs)
    finally:
        llm.close()
    return {"tokens": tokens, "logits": logits, "use_extra_bufts": bool(llm.model_params.use_extra_bufts),
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}


class _Recorded:
    """Answers `tokenize` from the child's answers, so tokenizer_parity works on them as on a live Llama."""

    def __init__(self, tokens):
        self._ids = {(text.encode("utf-8"), bos): ids for text, bos, ids in tokens}

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False):
        return self._ids[(text, add_bos)]


def tokenizer_parity(llm, tok, texts: list[str]) -> dict:
    mismatches, checked = [], 0
    for text in texts:
        for special in (False, True):
            hf = tok(text, add_special_tokens=special)["input_ids"]
            lc = llm.tokenize(text.encode("utf-8"), add_bos=special, special=True)
            checked += 1
            if list(hf) != list(lc):
                mismatches.append({"text": text[:80], "add_special": special, "hf": hf[:24], "llama_cpp": lc[:24]})
    return {"texts": checked, "identical": checked - len(mismatches), "mismatches": mismatches[:5]}


def llama_logits(llm, seqs: list[list[int]]) -> list[np.ndarray]:
    out = []
    for ids in seqs:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return out


def hf_logits(model, seqs: list[list[int]]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy() for ids in seqs]


def round_like_gguf(model, gguf_type: str) -> None:
    """Replace each weight by what llama.cpp reads back from the GGUF (same type choice as the writer)."""
    import torch

    with torch.no_grad():
        for _, p in model.named_parameters():
            ttype = tensor_type(tuple(p.shape), gguf_type)
            if ttype != "f32":
                p.copy_(torch.from_numpy(round_trip(p.float().numpy(), ttype)).to(p.dtype))


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    agree = total = 0
    max_d = 0.0
    for r, g in zip(ref, got):
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += r.shape[0]
        max_d = max(max_d, float(np.abs(r - g).max()))
    return {"max_abs_dlogit": max_d, "argmax_agreement": agree / max(total, 1), "positions": total}


BUFFERS = {True: "its default buffers", False: "extra buffer types off"}


def run_llama(gguf_path: Path, n_ctx: int, texts: list[str], seqs: list[list[int]]) -> tuple[dict | None, list]:
    """llama_side in a child process, so a llama.cpp crash cannot take export down. When the default CPU path
    crashes, once more with extra buffer types off. Returns (the answers or None, one record per attempt)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # say so before starting any child
        raise VerifyUnavailable(UNAVAILABLE)
    attempts = []
    for extra in (True, False):
        out = isolate.attempt(llama_side, str(gguf_path), n_ctx, texts, seqs, extra,
                              what=f"evaluating {gguf_path.name} with {BUFFERS[extra]}", runtime=RUNTIME,
                              tag="verify-default" if extra else "verify-no-extra-bufts")
        attempts.append({"use_extra_bufts": out.value["use_extra_bufts"] if out.ok else extra,
                         "crashed": not out.ok, **({"crash": out.crash.to_dict()} if out.crash else {})})
        if out.ok:
            return out.value, attempts
        log.warning("verify: %s", out.crash.message)
        for line in out.crash.log_tail:
            log.info("verify: llama.cpp said: %s", line)
    return None, attempts


def _crash_note(gguf_path: Path, attempts: list, passed: bool | None) -> str:
    """The sentence report.md and verify.json lead with when llama.cpp crashed ('' when it did not)."""
    first = attempts[0].get("crash")
    if not first:
        return ""
    head = (f"llama.cpp ({first['runtime']}) {_how(first)} on this CPU with its default buffers while evaluating "
            f"{gguf_path.name}")
    if passed is None:
        second = attempts[1]["crash"]
        return (f"{head}, and {_how(second)} again with extra buffer types off: verification could not run "
                f"(the GGUF is kept: {gguf_path}) — FAIL")
    return (f"{head}; with extra buffer types off it {'passed' if passed else 'ran, but failed the checks'}: "
            "users of this llama.cpp build on this CPU will hit the crash. ")


def _how(crash: dict) -> str:
    return (f"crashed with {crash['signal']}" if crash["signal"]
            else f"exited with code {crash['returncode']} and no result")


def _hf_comparison(merged_dir: Path, gguf_type: str, seqs: list[list[int]], lc: list) -> tuple[dict, dict]:
    """(vs the fp32 merged model, vs HF with its weights rounded as the GGUF stores them)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    model.eval()
    vs_merged = compare(hf_logits(model, seqs), lc)
    if gguf_type == "f32":
        return vs_merged, dict(vs_merged)
    round_like_gguf(model, gguf_type)
    return vs_merged, compare(hf_logits(model, seqs), lc)


def verify_gguf(gguf_path: Path, merged_dir: Path, gguf_type: str, seqs: list[list[int]], texts: list[str]) -> dict:
    """Tokenisation parity on `texts` and logit agreement on `seqs` between llama.cpp and HF; pass/fail.
    A llama.cpp crash is a result too: `passed` False, the crash in `llama_cpp_runs` and the summary."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    all_texts = list(TOKENIZER_TEXTS) + list(texts)
    side, attempts = run_llama(gguf_path, max(64, max(len(s) for s in seqs) + 8), all_texts, seqs)
    result = {"gguf": gguf_path.name, "gguf_type": gguf_type, "llama_cpp_python": _version(),
              "kv_cache": "f32", "llama_cpp_runs": attempts}
    if side is None:
        return {**result, "passed": False, "summary": _crash_note(gguf_path, attempts, None)}
    tokens = tokenizer_parity(_Recorded(side["tokens"]), tok, all_texts)
    vs_merged, vs_same = _hf_comparison(merged_dir, gguf_type, seqs, side["logits"])
    checks = {"tokenisation identical": tokens["identical"] == tokens["texts"],
              f"argmax agreement >= {100 * MIN_ARGMAX[gguf_type]:g}%":
                  vs_same["argmax_agreement"] >= MIN_ARGMAX[gguf_type]}
    if gguf_type == "f32":
        checks[f"max |dlogit| <= {F32_MAX_DLOGIT:g}"] = vs_same["max_abs_dlogit"] <= F32_MAX_DLOGIT
    passed = all(checks.values())
    result.update({"llama_cpp_system_info": side["system_info"], "tokenisation": tokens,
                   "vs_same_weights": vs_same, "vs_merged_fp32": vs_merged, "checks": checks, "passed": passed})
    failed = [k for k, ok in checks.items() if not ok]
    result["summary"] = _crash_note(gguf_path, attempts, passed) + (
        f"llama.cpp (llama-cpp-python {result['llama_cpp_python']}, f32 KV cache) on {gguf_path.name}: "
        f"tokenisation identical on {tokens['identical']}/{tokens['texts']} texts; logits vs HF with the same "
        f"{gguf_type} weights: max |Δlogit| {vs_same['max_abs_dlogit']:.2e}, argmax agreement "
        f"{100 * vs_same['argmax_agreement']:.2f}% of {vs_same['positions']} positions; vs the fp32 merged model: "
        f"max |Δlogit| {vs_merged['max_abs_dlogit']:.2e}, argmax {100 * vs_merged['argmax_agreement']:.2f}% — "
        + ("PASS" if passed else "FAIL (" + "; ".join(failed) + ")"))
    return result


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(RUNTIME)
    except PackageNotFoundError:
        return None
