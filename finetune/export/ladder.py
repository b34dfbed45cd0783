"""The fidelity ladder: what each GGUF type costs the fine-tune, measured in llama.cpp.

For every exported type (and the base + LoRA-adapter GGUF pair when it was written), against the fp32 merged
model in HF on the same held-out token sequences and prompts:
- file size and bits per weight;
- mean and max KL(P_fp32 || P_type) over every position, and top-1 (argmax) agreement;
- greedy generation agreement (identical continuations, and tokens agreeing up to the first divergence);
- the first held-out generation task's metric, from llama.cpp's own greedy decoding that stops at the run's
  stop tokens, scored by eval's metric function; beside it the base model's value (base -> tuned delta).

And one tight check per file: HF with its weights read back *from that GGUF* (dequantized by the gguf package)
against llama.cpp on the same ids. That difference is the runtime only (plus llama.cpp's 8-bit quantization of
activations in quantized matmuls), so a broken file fails it whatever the type.

Every llama.cpp call runs in a child process (finetune.isolate); a crash with llama.cpp's default buffers is
retried once with extra buffer types off, as --verify does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from finetune import isolate
from finetune.export.gguf import permute_qk
from finetune.export.verify import RUNTIME, _llama, hf_logits, llama_logits

log = logging.getLogger("finetune")

SAME_KL_FLOOR = {"f32": 1e-3, "f16": 1e-3, "bf16": 1e-3}
QUANT_SAME_KL_FLOOR = 1e-2
SAME_KL_FRACTION = 0.5
"""The tight check each file must pass: llama.cpp's mean KL from HF-on-this-file's-own-weights at most the type's
floor, or at most SAME_KL_FRACTION of its KL from the fp32 model (the stored weights explain most of the
difference). Quantized types get a higher floor because llama.cpp also rounds the activations to 8 bits in their
matmuls, which HF does not: on SmolLM2-135M that alone was KL 2.7e-3 for q8_0 (0.5e-2 for the k-quants), as much
as q8_0's weight rounding. A file read wrongly (unpermuted q/k, swapped tensors) is at KL ~1 or more."""


# ---------------------------------------------------------------------------------------------
# llama.cpp side (runs in the child)


def llama_greedy(llm, prompt: list[int], stops: list[int], max_new: int) -> dict:
    """Greedy decoding on llama.cpp's logits, stopping at the first stop token (not kept)."""
    llm.reset()
    llm.eval(prompt)
    out, stopped = [], False
    for _ in range(max_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in stops:
            stopped = True
            break
        out.append(nxt)
        llm.eval([nxt])
    return {"ids": out, "stopped": stopped, "text": llm.detokenize(out).decode("utf-8", "replace")}


def llama_ladder_side(path: str, n_ctx: int, seqs: list[list[int]], prompts: list[list[int]], stops: list[int],
                      max_new: int, extra_bufts: bool, lora_path: str | None = None) -> dict:
    """Logits on `seqs` and greedy generations on `prompts`, from one GGUF (plus a LoRA GGUF when given)."""
    llm = _llama(Path(path), n_ctx, extra_bufts, lora_path=lora_path)
    try:
        logits = llama_logits(llm, seqs)
        gens = [llama_greedy(llm, p, stops, max_new) for p in prompts]
    finally:
        llm.close()
    return {"logits": logits, "generations": gens, "use_extra_bufts": bool(llm.model_params.use_extra_bufts)}


def run_llama_ladder(path: Path, n_ctx: int, seqs, prompts, stops, max_new, lora_path: Path | None = None):
    """(answers or None, attempts): llama_ladder_side in a child, retried once with extra buffer types off."""
    attempts = []
    label = path.name + (f" + {lora_path.name}" if lora_path else "")
    for extra in (True, False):
        out = isolate.attempt(llama_ladder_side, str(path), n_ctx, seqs, prompts, stops, max_new, extra,
                              str(lora_path) if lora_path else None,
                              what=f"evaluating {label} ({'default buffers' if extra else 'extra buffer types off'})",
                              runtime=RUNTIME, tag="ladder-default" if extra else "ladder-no-extra-bufts")
        attempts.append({"use_extra_bufts": extra, "crashed": not out.ok,
                         **({"crash": out.crash.to_dict()} if out.crash else {})})
        if out.ok:
            return out.value, attempts
        log.warning("ladder: %s", out.crash.message)
    return None, attempts


# ---------------------------------------------------------------------------------------------
# Numbers


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_top1(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Per position KL(P_ref || P_got) in nats (mean and max) and top-1 agreement, over every sequence."""
    kls, agree = [], []
    for r, g in zip(ref, got):
        lr, lg = _log_softmax(r), _log_softmax(g)
        kls.append((np.exp(lr) * (lr - lg)).sum(-1))
        agree.append(r.argmax(-1) == g.argmax(-1))
    kl, top1 = np.concatenate(kls), np.concatenate(agree)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1_agreement": float(top1.mean()),
            "positions": int(kl.size)}


def task_value(task: dict, texts: list[str]) -> float:
    """The task's metric (eval's own scoring function) averaged over the prompts."""
    vals = [task["score"](t, refs) for t, refs in zip(texts, task["references"])]
    return float(np.mean(vals)) if vals else float("nan")


# ---------------------------------------------------------------------------------------------
# HF side


def hf_greedy(model, prompts: list[list[int]], stops: list[int], max_new: int, pad_id: int) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                                 pad_token_id=pad_id, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            new = ids[0, len(p):].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            out.append(new if cut is None else new[:cut])
    return out


def load_gguf_weights(model, gguf_path: Path) -> int:
    """Overwrite every HF parameter with the tensor llama.cpp reads from the GGUF (dequantized, q/k un-permuted)."""
    import gguf
    import torch
    from gguf import GGUFReader

    cfg = model.config
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    params = dict(model.named_parameters())
    by_gguf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in params}
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    done = 0
    with torch.no_grad():
        for t in GGUFReader(str(gguf_path)).tensors:
            key = by_gguf.get(t.name)
            if key is None:
                continue
            p = params[key]
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(p.shape)).astype(np.float32)
            if key.endswith(("q_proj.weight", "k_proj.weight")):
                data = unpermute_qk(data, n_head if key.endswith("q_proj.weight") else n_kv)
            p.copy_(torch.from_numpy(np.ascontiguousarray(data)).to(p.dtype))
            done += 1
    return done


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of gguf.permute_qk (llama.cpp's rotary layout -> HF's)."""
    out = (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
    assert np.array_equal(permute_qk(out, n_head), w)
    return out


def same_weights(merged_dir: Path, gguf_path: Path, seqs: list[list[int]], lc_logits: list[np.ndarray]) -> dict:
    """HF with this GGUF's own weights vs llama.cpp: argmax agreement and max |dlogit| (the runtime's share)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    model.eval()
    load_gguf_weights(model, gguf_path)
    ref = hf_logits(model, seqs)
    return {**kl_top1(ref, lc_logits),
            "max_abs_dlogit": max(float(np.abs(r - g).max()) for r, g in zip(ref, lc_logits))}
