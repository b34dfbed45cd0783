"""Batched greedy generation (left padding, KV cache), teacher-forced log-likelihoods, and streaming.

Every model under evaluation goes through the same two functions with the same decoding settings, so the
base and the fine-tuned model differ only in their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm


@dataclass
class Generation:
    text: str
    """The reply, decoded up to (not including) the stop token."""
    n_tokens: int
    stopped: bool
    """True when the model emitted one of the template's stop tokens within max_new_tokens."""
    stop_id: int | None = None
    """Which stop token ended the reply (the template's end of turn, or EOS when they differ), None if none did."""


def stop_token_ids(tok, template) -> list[int]:
    """Ids of the template's stop tokens (its end-of-turn token, and EOS): the same ones `chat` stops on."""
    ids = []
    for t in template.stop_tokens(tok):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.append(i)
    return list(dict.fromkeys(ids))


def _pad_id(tok) -> int:
    # Padded positions are masked out, so any id works when a tokenizer has no pad token.
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(order: list[int], size: int):
    for k in range(0, len(order), size):
        yield order[k:k + size]


def _config(stops: list[int], pad_id: int, max_new_tokens: int, temperature: float = 0.0):
    from transformers import GenerationConfig

    # A fresh config, so nothing from the checkpoint's generation_config.json (sampling, repetition penalty)
    # leaks in and makes base and tuned decode differently.
    if temperature > 0:
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0,
                                eos_token_id=stops, pad_token_id=pad_id)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad_id)


def _finish(new_ids: list[int], stops: list[int], tok) -> Generation:
    cut = next((k for k, t in enumerate(new_ids) if t in stops), None)
    kept = new_ids if cut is None else new_ids[:cut]
    return Generation(tok.decode(kept, skip_special_tokens=True), len(kept), cut is not None,
                      None if cut is None else new_ids[cut])


@torch.no_grad()
def greedy_generate(model, tok, prompts: list[list[int]], stops: list[int], max_new_tokens: int,
                    batch_size: int = 8, desc: str | None = None) -> list[Generation]:
    """Greedy replies to token-id prompts, batched longest-first with left padding."""
    pad = _pad_id(tok)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    dev = _device(model)
    cfg = _config(stops, pad, max_new_tokens)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    for batch in _batches(order, batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
        for r, i in enumerate(batch):
            out[i] = _finish(gen[r, width:].tolist(), stops, tok)
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


@torch.no_grad()
def masked_nll(model, seqs: list[tuple[list[int], list[int]]], pad_id: int | None, batch_size: int = 8,
               desc: str | None = None) -> list[tuple[float, int]]:
    """For each (input_ids, labels) pair: the summed negative log-likelihood of the labelled tokens
    (labels != -100, each predicted from the tokens before it) and how many there are."""
    pad_id = 0 if pad_id is None else pad_id
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, int] | None] = [None] * len(seqs)
    dev = _device(model)
    bar = tqdm(total=len(seqs), desc=desc, unit="row", leave=False)
    for batch in _batches(order, batch_size):
        width = max(len(seqs[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):  # right padding: positions start at 0 for every row
            s, lab = seqs[i]
            ids[r, :len(s)] = torch.tensor(s)
            labels[r, :len(lab)] = torch.tensor(lab)
            mask[r, :len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1]
        target = labels[:, 1:].to(dev)
        valid = target != -100
        # log-softmax only where a label is scored: the full (batch, length, vocab) tensor is large.
        logp = torch.log_softmax(logits[valid].float(), dim=-1)
        picked = logp.gather(-1, target[valid].unsqueeze(-1)).squeeze(-1)
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=dev)
        per_row.index_add_(0, valid.nonzero()[:, 0], -picked.double())
        for r, i in enumerate(batch):
            out[i] = (float(per_row[r]), int(valid[r].sum()))
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


@torch.no_grad()
def stream_reply(model, tok, prompt: list[int], stops: list[int], max_new_tokens: int,
                 on_text: Callable[[str], None], temperature: float = 0.0) -> Generation:
    """Generate one reply, calling on_text with each piece of decoded text as soon as it is final."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    dev = _device(model)
    ids = torch.tensor([prompt], device=dev)
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         generation_config=_config(stops, _pad_id(tok), max_new_tokens, temperature),
                         streamer=_Streamer(tok, skip_prompt=True, skip_special_tokens=True))
    return _finish(gen[0, len(prompt):].tolist(), stops, tok)
