"""Attention per example inside a packed row (the `sdpa` kernel, without the block-diagonal mask).

A padding-free packed batch is one row of tokens whose position_ids restart at every example. For `sdpa`,
transformers turns that into a dense [T, T] block-diagonal mask, and the kernel then scores every pair of the T
tokens and masks out all but each example's own block: with seven examples in a 1024-token row, six sevenths of
attention's work is thrown away (it was a fifth of a default CPU step, bench/RESULTS.md, issue 16). Here sdpa
runs once per example (causal, no mask), which is the same attention (tests/test_packing.py compares logits and
gradients) for sum(l_i^2) work instead of T^2. The GPU's flash-attention-2 already does this from position_ids
itself; this gives the same to sdpa on any device.

Only training with our packing uses it (train.build_model, with model.attn_implementation: auto); whenever the position_ids do not describe
several examples, or a KV cache is in play, it is plain sdpa with transformers' mask. Evaluation, generation and
merge load the model afresh with plain sdpa.
"""

from __future__ import annotations

import weakref

NAME = "finetune_packed_sdpa"
"""The attn_implementation name registered with transformers' AttentionInterface."""

_last: tuple = (None, None)  # (weakref to the position_ids tensor, its segments): every layer sees the same tensor


def register() -> str:
    """Register the attention (and sdpa's own mask builder under its name); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def segments(position_ids, q_len: int, k_len: int) -> list[list[tuple[int, int]]] | None:
    """[(start, end)] per batch row, one span per example (a new example starts where the position does not
    continue the previous one), or None when there is nothing to split: no position_ids, a KV cache (query and
    key lengths differ), or one example per row."""
    global _last
    if position_ids is None or q_len != k_len or position_ids.shape[-1] != q_len:
        return None
    ref, cached = _last
    if ref is not None and ref() is position_ids:
        return cached
    pos = position_ids.reshape(-1, q_len)
    # One transfer of the row's boundaries per forward pass (not per layer): the cache above holds them.
    breaks = (pos[:, 1:] != pos[:, :-1] + 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(pos.shape[0])]
    for row, i in breaks:
        starts[row].append(i + 1)
    spans = [list(zip(s, s[1:] + [q_len])) for s in starts]
    result = None if all(len(s) == 1 for s in spans) else spans
    _last = (weakref.ref(position_ids), result)
    return result


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = segments(kwargs.get("position_ids"), query.shape[2], key.shape[2])
    if spans is None or query.shape[0] != len(spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = []
    for b, row in enumerate(spans):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                        value[b:b + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                        is_causal=True)[0] for s, e in row]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None
