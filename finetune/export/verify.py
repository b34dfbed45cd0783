"""Check an exported GGUF in an independent runtime: llama.cpp, through the llama-cpp-python package.

Two questions, answered with numbers:
- Does llama.cpp tokenise the probe texts (special tokens, unicode, emoji) exactly as the HF tokenizer does?
- Fed the same token ids, does it compute the logits the HF merged model computes? The tight comparison is
  against HF with its weights rounded exactly as they were stored in the GGUF, so the only remaining
  difference is the runtime; the comparison with the unrounded merged model shows what the GGUF type costs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from finetune.export.gguf import round_trip, tensor_type

log = logging.getLogger("finetune")

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


def _llama(path: Path, n_ctx: int):
    try:
        import llama_cpp
    except ImportError:
        raise VerifyUnavailable("--verify needs llama-cpp-python: pip install llama-cpp-python "
                                "(pip builds it from source once, ~7 minutes on a CPU)") from None
    # type_k/type_v 0 = GGML_TYPE_F32: an f16 KV cache alone moves the logits by ~1e-2.
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                           type_k=0, type_v=0, verbose=False, seed=0)


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


@torch.no_grad()
def hf_logits(model, seqs: list[list[int]]) -> list[np.ndarray]:
    return [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy() for ids in seqs]


@torch.no_grad()
def round_like_gguf(model, gguf_type: str) -> None:
    """Replace each weight by what llama.cpp reads back from the GGUF (same type choice as the writer)."""
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


def verify_gguf(gguf_path: Path, merged_dir: Path, gguf_type: str, seqs: list[list[int]], texts: list[str]) -> dict:
    """Tokenisation parity on `texts` and logit agreement on `seqs` between llama.cpp and HF; pass/fail."""
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    n_ctx = max(64, max(len(s) for s in seqs) + 8)
    llm = _llama(gguf_path, n_ctx)
    try:
        tokens = tokenizer_parity(llm, tok, list(TOKENIZER_TEXTS) + list(texts))
        lc = llama_logits(llm, seqs)
    finally:
        llm.close()
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    model.eval()
    vs_merged = compare(hf_logits(model, seqs), lc)
    if gguf_type == "f32":
        vs_same = dict(vs_merged)
    else:
        round_like_gguf(model, gguf_type)
        vs_same = compare(hf_logits(model, seqs), lc)
    del model
    checks = {"tokenisation identical": tokens["identical"] == tokens["texts"],
              f"argmax agreement >= {100 * MIN_ARGMAX[gguf_type]:g}%":
                  vs_same["argmax_agreement"] >= MIN_ARGMAX[gguf_type]}
    if gguf_type == "f32":
        checks[f"max |dlogit| <= {F32_MAX_DLOGIT:g}"] = vs_same["max_abs_dlogit"] <= F32_MAX_DLOGIT
    passed = all(checks.values())
    result = {"gguf": gguf_path.name, "gguf_type": gguf_type, "llama_cpp_python": version("llama-cpp-python"),
              "kv_cache": "f32", "tokenisation": tokens, "vs_same_weights": vs_same, "vs_merged_fp32": vs_merged,
              "checks": checks, "passed": passed}
    failed = [k for k, ok in checks.items() if not ok]
    result["summary"] = (
        f"llama.cpp (llama-cpp-python {result['llama_cpp_python']}, f32 KV cache) on {gguf_path.name}: "
        f"tokenisation identical on {tokens['identical']}/{tokens['texts']} texts; logits vs HF with the same "
        f"{gguf_type} weights: max |Δlogit| {vs_same['max_abs_dlogit']:.2e}, argmax agreement "
        f"{100 * vs_same['argmax_agreement']:.2f}% of {vs_same['positions']} positions; vs the fp32 merged model: "
        f"max |Δlogit| {vs_merged['max_abs_dlogit']:.2e}, argmax {100 * vs_merged['argmax_agreement']:.2f}% — "
        + ("PASS" if passed else "FAIL (" + "; ".join(failed) + ")"))
    return result
