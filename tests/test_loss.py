"""The chunked SFT loss (finetune/loss.py) equals the plain full-logits loss, in value and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from finetune import loss as L


def _plain(hidden, weight, targets):
    z = hidden @ weight.t()
    logp = torch.log_softmax(z.float(), -1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy, z.argmax(-1) == targets


@pytest.mark.parametrize("train_head", [False, True])
def test_chunks_equal_full_logits(train_head):
    """Several chunks (the last one partial): log-probs, entropy, top-1 and the gradients of hidden (and of the
    head when it trains) equal the full-logits computation to fp32 rounding."""
    torch.manual_seed(0)
    n, h, v = 23, 16, 97
    hidden = torch.randn(n, h, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h) * 0.5).requires_grad_(train_head)
    targets = torch.randint(0, v, (n,))
    targets[3] = int((hidden[3] @ weight.t()).argmax())  # one sure top-1
    g = torch.randn(n)  # a non-uniform incoming gradient

    lp, ent, top1 = L.chunked_log_probs(hidden, weight, targets, chunk=5)
    (lp * g).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone() if train_head else None
    hidden.grad = weight.grad = None
    lp0, ent0, top10 = _plain(hidden, weight, targets)
    (lp0 * g).sum().backward()

    torch.testing.assert_close(lp, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent0, rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, top10) and bool(top1[3])
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if train_head:
        torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer does
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def test_model_loss_and_grads_equal_plain(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """Through the model as TRL's SFTTrainer calls it (fused_lm_head=True): masked labels (-100), a supervised end
    token, and gradient accumulation's num_items_in_batch. Loss and every LoRA gradient equal the model's own
    full-logits loss; entropy and token accuracy (TRL's metrics) equal the full logits' too."""
    model = _lora_model(tiny_model_dir)
    assert L.install(model)
    monkeypatch.setattr(L, "CHUNK_BYTES", 4 * model.config.vocab_size * 3)  # 16-token chunks: several per batch
    eos = tiny_tokenizer.eos_token_id
    torch.manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[0, :9] = -100  # the prompt
    labels[1, :4] = labels[1, 20:] = -100  # prompt and padding
    ids[0, -1] = labels[0, -1] = eos  # the end token is supervised
    ids[1, 19] = labels[1, 19] = eos
    n_items = 50  # tokens of the whole accumulated step, more than this micro-batch's 31

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, num_items_in_batch=n_items, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused, g1 = grads(fused_lm_head=True)
    plain, g0 = grads()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert int(fused.label_mask.sum()) == 31 == int((labels[:, 1:] != -100).sum())
    assert g1.keys() == g0.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    logp = torch.log_softmax(plain.logits[:, :-1].float(), -1)
    mask = labels[:, 1:] != -100
    entropy = -(logp.exp() * logp).sum(-1)[mask]
    torch.testing.assert_close(fused.entropy[mask], entropy, rtol=1e-4, atol=1e-5)
    top1 = (plain.logits[:, :-1].argmax(-1) == labels[:, 1:])[mask]
    assert torch.equal(fused.is_top1[mask], top1)


def test_plan_counts_logits_with_and_without_chunks():
    """The planner's logits term: full logits grow with the tokens, chunked ones stop at the chunk; the plan
    prints both."""
    from finetune import plan as P

    shape = P.SHAPES["llama-3-8b"]
    s = P.Setup(seq_len=2048, batch=1, device="cpu", compute="fp32")
    v, h = shape.vocab, shape.hidden
    assert P.logits_bytes(shape, s, chunked=False) == 2048 * (12 * v + 256)  # the fp32 logits alone are 0.98 GiB
    chunked = P.logits_bytes(shape, s, chunked=True)
    assert chunked == 8 * v * P.chunk_tokens(v) + 2048 * (4 * h + 32) < 2 * L.CHUNK_BYTES + 2048 * (4 * h + 32) + 1
    longer = P.logits_bytes(shape, replace(s, seq_len=8192), chunked=True)
    assert longer - chunked == 6144 * (4 * h + 32)  # only per-token vectors grow
    plan = P.estimate(shape, s)
    note = next(p.note for p in plan.parts if p.key == "activations")
    assert P.fmt(chunked) in note and P.fmt(P.logits_bytes(shape, s, chunked=False)) in note
    full = P.estimate(shape, replace(s, chunked_loss=False))
    assert full.part("activations") > plan.part("activations") + 2 * 2**30


def test_sft_run_uses_chunked_loss_and_keeps_metrics(recipe_factory, monkeypatch):
    """`finetune train` (SFT on the CPU) computes its loss here, and TRL's entropy and token accuracy still log."""
    import json

    from finetune.recipe import load_recipe
    from finetune.train import train

    calls = []
    real = L.fused_output
    monkeypatch.setattr(L, "fused_output", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = recipe_factory()
    run = train(load_recipe(path), path)
    logs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert calls and any("mean_token_accuracy" in x and "entropy" in x for x in logs)
    assert all(x["loss"] == x["loss"] for x in logs if "loss" in x)  # finite, not NaN
