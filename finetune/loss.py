"""The SFT loss without a [tokens, vocab] logits tensor: cross-entropy over the vocabulary in chunks of tokens.

TRL 1.16's SFTTrainer patches the model with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) and calls
`model(**inputs, fused_lm_head=True)`, reading `log_probs`, `entropy`, `is_top1` and `label_mask` from the output.
On a GPU with Triton that head is already tiled. Without Triton (the CPU) it falls back to torch operations that
score *every* position, prompt and padding included, and allocate about ten fresh [4096 tokens x 32768 vocab]
fp32 temporaries per tile in forward and backward: for SmolLM2 (49k vocabulary) a 1024-token micro-batch allocates
and page-faults ~1.3 GB per step for the loss alone.

`install(model)` wraps that patched forward. With `fused_lm_head=True` on a device without Triton, it:
  - scores only the positions whose label is not -100 (the lm_head matmul is ~20% of SmolLM2's FLOPs, and
    assistant-only labels mask the prompt);
  - projects `chunk_tokens(vocab)` tokens at a time (CHUNK_BYTES of fp32 logits per chunk, reused in place),
    keeping per token only the log-partition (logsumexp) for backward;
  - recomputes each chunk's logits in backward and turns them into the gradient in place:
    dL/dz = g * (onehot(target) - softmax(z)).
The rule is simply the chunk size: a forward whose scored tokens x vocab x 4 bytes fit in CHUNK_BYTES is one chunk
(the same computation as full logits); a larger one never holds more than CHUNK_BYTES (x2 with the entropy
metric) of logits. On a GPU with Triton, TRL's own tiled kernel runs unchanged.

The loss is TRL's: sum of -log p(label) over scored tokens / num_items_in_batch (the count of scored tokens when
not given), so gradient accumulation normalises as full-batch training does. tests/test_loss.py checks loss and
gradients against the model's own full-logits loss.
"""

from __future__ import annotations

import functools
import types

import torch

from finetune.plan.byte_model import LOSS_CHUNK_BYTES as CHUNK_BYTES
from finetune.plan.byte_model import chunk_tokens

# CHUNK_BYTES: fp32 logits per chunk, 32 MiB = 170 tokens of SmolLM2's 49k vocabulary, 65 of Llama-3's 128k. The
# planner counts the same term (finetune/plan/byte_model.py: logits_bytes, with and without chunking).


class ChunkedLogProbs(torch.autograd.Function):
    """log p(target) for rows of `hidden @ weight.T`, `chunk` rows at a time; also the entropy and whether the
    target is the (first) argmax, both without gradient (TRL logs them as metrics).

    With a frozen `weight` (LoRA) the gradient is computed in forward, chunk by chunk, while the chunk's softmax
    is at hand: d log p(t) / d hidden = (onehot(t) - softmax(z)) @ W, an [N, H] tensor, so backward only scales it
    by the incoming per-token gradient and no logits are recomputed (two matmuls per chunk, as with full logits).
    A trainable `weight` (lm_head or tied embeddings in modules_to_save) needs the incoming gradient for its own
    gradient: then forward keeps only the log-partition and backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, want_entropy: bool):
        n = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        early = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        log_z = hidden.new_empty(n, dtype=torch.float32)
        target_z = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32) if want_entropy else None
        top1 = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        grad_h = torch.empty_like(hidden) if early else None
        w = weight.to(dtype)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = torch.mm(hidden[s:e].to(dtype), w.t()).float()  # [c, V] fp32
            t = targets[s:e, None]
            target_z[s:e] = z.gather(1, t).squeeze(1)
            top1[s:e] = z.argmax(1) == t.squeeze(1)
            m = z.amax(1, keepdim=True)
            z.sub_(m)
            p = torch.exp(z) if want_entropy else z.exp_()
            total = p.sum(1)
            if want_entropy:  # sum_v e_v z_v, multiplied into z (not needed after this): no third [c, V] tensor
                entropy[s:e] = torch.log(total) - z.mul_(p).sum(1) / total
            log_z[s:e] = m.squeeze(1) + torch.log(total)
            if early:
                p.div_(total[:, None]).neg_().scatter_add_(1, t, torch.ones_like(t, dtype=p.dtype))
                grad_h[s:e] = torch.mm(p.to(dtype), w).to(hidden.dtype)
            del z, p  # before the next chunk's logits are allocated
        ctx.save_for_backward(grad_h if early else hidden, weight, targets, log_z)
        ctx.early, ctx.chunk = early, chunk
        outs = (target_z - log_z, entropy, top1)
        ctx.mark_non_differentiable(*(x for x in outs[1:] if x is not None))
        return outs

    @staticmethod
    def backward(ctx, grad_lp, *_):
        saved, weight, targets, log_z = ctx.saved_tensors
        if grad_lp is None:
            return None, None, None, None, None
        if ctx.early:
            return saved * grad_lp[:, None].to(saved.dtype), None, None, None, None
        hidden, dtype = saved, _compute_dtype(saved)
        w = weight.to(dtype)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = min(s + ctx.chunk, hidden.shape[0])
            h = hidden[s:e].to(dtype)
            g = grad_lp[s:e].float()
            dz = torch.mm(h, w.t()).float()
            dz.sub_(log_z[s:e, None]).exp_().mul_(-g[:, None])  # -g * softmax(z)
            dz.scatter_add_(1, targets[s:e, None], g[:, None])  # + g at the target
            dz = dz.to(dtype)
            if grad_h is not None:
                grad_h[s:e] = torch.mm(dz, w).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.t().float(), h.float())
            del dz
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def chunked_log_probs(hidden, weight, targets, chunk: int | None = None, want_entropy: bool = True):
    """(log p(target), entropy or None, is_top1) for each row of `hidden` [N, H] under lm_head `weight` [V, H]."""
    chunk = chunk or chunk_tokens(weight.shape[0], CHUNK_BYTES)
    return ChunkedLogProbs.apply(hidden, weight, targets, chunk, want_entropy)


def _plain_head(model) -> bool:
    """A LM head we reproduce exactly: logits = hidden @ W.T, no bias, no scaling or soft-capping."""
    cfg = model.config.get_text_config()
    head = model.get_output_embeddings()
    scaled = any(getattr(cfg, k, None) not in (None, 1.0) for k in
                 ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    # a plain nn.Linear: peft's wrappers (modules_to_save, trainable token rows) add to the weight in forward
    return type(head) is torch.nn.Linear and head.bias is None and not scaled


def _use_triton(device: torch.device) -> bool:
    from transformers.utils import is_triton_available

    return device.type in ("cuda", "xpu") and is_triton_available()


def install(model) -> bool:
    """Route `model(..., fused_lm_head=True)` (TRL's SFT loss) through ChunkedLogProbs where TRL would use its
    untiled torch fallback. `model` is the PeftModel or the causal LM that TRL patched. False when left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not _plain_head(base) or not isinstance(getattr(base.forward, "__self__", None), torch.nn.Module):
        return False
    trl_forward = base.forward  # TRL's fused forward (it wraps the model's own)

    @functools.wraps(type(base).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head or shift_labels is not None or kw.get("output_router_logits") \
                or getattr(self.config.get_text_config(), "output_router_logits", False):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kw)
        weight = self.get_output_embeddings().weight
        if _use_triton(weight.device) or type(weight) is not torch.nn.Parameter:  # Triton, or FSDP's DTensor
            return trl_forward(*args, fused_lm_head=True, labels=labels, num_items_in_batch=num_items_in_batch, **kw)
        kw["use_cache"] = False
        hidden_states = self.base_model(*args, **kw).last_hidden_state
        return fused_output(hidden_states, labels, weight, num_items_in_batch)

    base.forward = types.MethodType(forward, base)
    return True


def fused_output(hidden_states, labels, weight, num_items_in_batch=None):
    """TRL's FusedCausalLMOutput (loss, log_probs, entropy, is_top1, label_mask) from the backbone's last hidden
    states, scoring only the positions whose next-token label is not -100."""
    from trl.trainer.utils import FusedCausalLMOutput

    hidden = hidden_states[:, :-1]
    labels = labels[:, 1:].to(hidden.device)
    mask = labels != -100
    lp, entropy, top1 = chunked_log_probs(hidden[mask], weight, labels[mask])
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero)
    per_token = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (lp, entropy, top1)]
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -per_token[0].sum() / denom
    return FusedCausalLMOutput(loss=loss, log_probs=per_token[0], entropy=per_token[1], is_top1=per_token[2],
                               label_mask=mask)
