"""`finetune plan` for the LoRA variants of issue 18, checked on this CPU like the SFT plan (tests/test_plan.py):
DoRA's magnitude vectors (parameters, gradients, Adam state) and what its forward keeps for backward, and the
trainable new-token rows (one [new, hidden] delta per embedding matrix, the grown vocabulary, and the loss TRL runs
for a wrapped lm_head), against model_bytes / optimizer_bytes and the profiler's measured step peak."""

from __future__ import annotations

import pytest
import torch

from finetune import plan as P
from finetune.hardware import choose_precision, detect_hardware
from finetune.memory import model_bytes, optimizer_bytes, step_peak_bytes
from finetune.models import add_new_tokens, attach_lora, load_base, resize_for_tokenizer, resolve_base
from finetune.recipe import load_recipe

NEW = ["<a1>", "<a2>", "<a3>"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield


def _loaded(recipe_path, overrides=()):
    """The model as train() builds it: new tokens added and rows resized, LoRA attached, adapters in fp32."""
    from transformers import AutoTokenizer

    recipe = load_recipe(recipe_path, list(overrides))
    hw = detect_hardware("cpu")
    model = load_base(recipe, resolve_base(recipe.model.base), choose_precision(recipe, hw), hw)
    ids = []
    if recipe.data.add_tokens:
        tok = AutoTokenizer.from_pretrained(recipe.model.base)
        ids = add_new_tokens(tok, list(recipe.data.add_tokens))
        resize_for_tokenizer(model, tok)
    model = attach_lora(model, recipe, recipe.train.gradient_checkpointing, new_token_ids=ids)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return recipe, model


VARIANTS = {"dora": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True}},
            "new_tokens": {"data": {"add_tokens": NEW}}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exact_bytes_of_dora_and_token_rows(recipe_factory, variant):
    recipe, model = _loaded(recipe_factory(**VARIANTS[variant]))
    plan = P.plan_recipe(recipe, None, device="cpu")
    got = model_bytes(model)
    assert got == {k: plan.part(k) for k in got}
    plain = P.plan_recipe(load_recipe(recipe_factory()), None, device="cpu")
    assert plan.part("lora") > plain.part("lora")  # the variant's own trainable tensors are counted
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert optimizer_bytes(opt) == plan.part("optimizer")
    assert sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad) == plan.part("grads")


@pytest.mark.parametrize("variant,ckpt,dropout,fused", [
    ("dora", False, 0.0, False), ("dora", True, 0.0, False), ("dora", False, 0.1, False), ("dora", True, 0.1, False),
    ("dora", False, 0.0, True), ("new_tokens", False, 0.0, False), ("new_tokens", False, 0.0, True),
    ("new_tokens", True, 0.0, True)])
def test_activation_estimate_matches_profiler(recipe_factory, variant, ckpt, dropout, fused):
    """fused: the loss as our SFT runs compute it (TRL's fused LM head; finetune/loss.py serves a plain head only,
    so a run with new token rows runs TRL's own torch path)."""
    recipe, model = _loaded(recipe_factory(**VARIANTS[variant]), [f"train.gradient_checkpointing={str(ckpt).lower()}",
                                                                  f"lora.dropout={dropout}"])
    model.config.use_cache = False
    model.train()
    if fused:
        from trl.trainer.utils import add_fused_lm_head

        from finetune.loss import install

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        assert install(model) == (variant != "new_tokens")
    measured = step_peak_bytes(model, batch=4, seq=48, fused=fused)
    plan = P.plan_recipe(recipe, None, device="cpu", batch=4, seq_len=48, chunked_loss=fused)
    assert plan.part("activations") == pytest.approx(measured, rel=0.05)
