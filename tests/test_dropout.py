"""LoRA dropout's lane masks (finetune/dropout.py): the same Bernoulli mask as torch's dropout, checked against
binomial statistics and a direct computation of the forward and backward, and swapped into CPU training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from finetune.dropout import LANES, LaneDropout, keep_mask, use_lane_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_drops_each_element_independently_with_probability_p(p):
    torch.manual_seed(0)
    n = 1 << 21
    keep = keep_mask((n,), round(p * LANES))
    dropped = (~keep).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.mean().item() - p) < 5 * sigma
    # The four lanes of one 64-bit draw (and neighbouring draws) are independent: both of two neighbours drop
    # with probability p^2, at every offset within and across words.
    for offset in (1, 2, 3, 4, 5):
        both = (dropped[:-offset] * dropped[offset:]).mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n), offset


def test_mask_shape_that_is_not_a_multiple_of_four_and_zero_p():
    keep = keep_mask((3, 5, 7), 3277)
    assert keep.shape == (3, 5, 7) and keep.dtype == torch.bool
    assert keep_mask((1000,), 0).all()


def test_forward_and_backward_are_the_masked_scaled_input():
    torch.manual_seed(1)
    drop = LaneDropout(0.2).train()
    x = torch.randn(64, 48, requires_grad=True)
    g = torch.randn(64, 48)
    y = drop(x)
    y.backward(g)
    keep = y != 0  # x has no zeros, so the kept elements are exactly the non-zero outputs
    scale = 1 / (1 - drop.p)
    assert 0 < (~keep).sum() < keep.sum()
    torch.testing.assert_close(y, torch.where(keep, x.detach() * scale, torch.zeros_like(y)), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.where(keep, g * scale, torch.zeros_like(g)), rtol=0, atol=0)


def test_expectation_is_the_input_and_eval_is_identity():
    torch.manual_seed(2)
    drop = LaneDropout(0.05).train()
    x = torch.full((1 << 20,), 3.0)
    assert drop(x).mean().item() == pytest.approx(3.0, rel=2e-3)
    assert drop.p == 3277 / LANES  # 0.05 rounded to a multiple of 1/65536
    drop.eval()
    assert drop(x) is x


def test_seeded_masks_repeat():
    drop = LaneDropout(0.3).train()
    x = torch.randn(128, 32)
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    torch.manual_seed(8)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cpu_training_builds_the_model_with_lane_dropout(recipe_factory):
    """train.build_model (the path `finetune train` takes) swaps every LoRA layer's dropout, trains through it, and
    the adapter's state dict is unchanged by the swap."""
    from finetune import train as T
    from finetune.recipe import load_recipe

    path = recipe_factory(lora={"dropout": 0.1})
    recipe = load_recipe(path)
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    r = T.setup(recipe, path, False, False, [], None)
    prep = T.prepare_data(r)
    model = T.build_model(r)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    drops = [m.lora_dropout["default"] for m in lora_layers]
    assert drops and all(isinstance(d, LaneDropout) and d.p == pytest.approx(0.1, abs=1 / LANES) for d in drops)
    assert not any(".lora_dropout." in k for k in model.state_dict())
    trainer = T.build_trainer(r, prep, model)
    batch = trainer.data_collator([prep.train[i] for i in range(2)])
    model.train()
    trainer.compute_loss(model, batch).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_swap_leaves_zero_dropout_and_keeps_train_mode():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    for p, expected in ((0.0, 0), (0.1, 7)):
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=p, target_modules="all-linear"))
        model.train()
        assert use_lane_dropout(model) == expected
        if expected:
            assert all(m.training for m in model.modules() if isinstance(m, LaneDropout))
