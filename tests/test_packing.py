"""Packing (the recipe default): TRL's BFD packing + padding-free batches give, for every example, exactly the
logits and supervised labels it gets alone. Checked on the tiny 4-bit model with a non-identity LoRA."""

from __future__ import annotations

import pytest
import torch

from finetune.data import prepare
from finetune.hardware import choose_precision, detect_hardware
from finetune.models import attach_lora, load_base, load_tokenizer, resolve_base
from finetune.recipe import load_recipe
from finetune.templates import load_template

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: with two threads, most of the time goes to waiting for the other
    thread to be scheduled."""
    from merged_run import one_thread

    with one_thread():
        yield


ROWS = [{"instruction": "what is " + " ".join(["red"] * (1 + i % 7)), "input": "", "output": " ".join(["blue"] * (1 + 3 * i % 11))}
        for i in range(12)]


def test_packed_logits_equal_per_example_logits(recipe_factory):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.data.packing import pack, step_shape

    recipe = load_recipe(recipe_factory(rows=ROWS), ["data.packing=true", "data.max_length=64"])
    assert recipe.data.packing
    source = resolve_base(recipe.model.base)
    tok = load_tokenizer(recipe, source)
    template = load_template(recipe.data.template, tok)
    data = prepare(recipe, tok, template, use_cache=False).train
    hw = detect_hardware("cpu")
    model = attach_lora(load_base(recipe, source, choose_precision(recipe, hw), hw), recipe, False)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # a LoRA that changes the output, so the adapter path is compared too
    model.eval()
    probe = torch.tensor([data["input_ids"][0]])
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=probe, use_cache=False).logits
        assert (model(input_ids=probe, use_cache=False).logits - base_logits).abs().max() > 1e-2

    # What training does: our blocks (finetune.data.packing.pack, a step holding micro x accum examples), then
    # TRL's padding-free collation (one row, position_ids restarting at each example from `seq_lengths`).
    lengths = [len(x) for x in data["input_ids"]]
    packed = pack(data, step_shape(lengths, 4, 2, recipe.data.max_length, packing=True))
    assert len(packed) < len(data)  # several examples per block
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
        [packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]

    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    singles = {tuple(ids): labels for ids, labels in zip(data["input_ids"], data["labels"])}
    assert len(starts) - 1 == len(data)
    worst = 0.0
    for a, b in zip(starts, starts[1:]):
        ids = batch["input_ids"][0, a:b]
        labels = singles[tuple(ids.tolist())]
        with torch.no_grad():
            alone = model(input_ids=ids[None], use_cache=False).logits[0]
        worst = max(worst, (alone - packed_logits[a:b]).abs().max().item())
        # The same tokens are supervised (the first token of a block is never a target, packed or not).
        assert batch["labels"][0, a + 1:b].tolist() == list(labels[1:])
    assert worst < 1e-4, worst


def test_packed_batches_are_one_block_per_forward_without_flash_attention(recipe_factory, tmp_path):
    """sdpa/eager attend over the whole flattened row of a packed micro-batch: one block per forward pass, the
    blocks of a step in accumulation. flash-attention's varlen kernel may take several blocks per forward."""
    from finetune.data.packing import step_shape
    from finetune.hardware import Hardware, Precision
    from finetune.train import sft_config

    lengths = [12 + (7 * i) % 40 for i in range(200)]
    recipe = load_recipe(recipe_factory(), ["train.micro_batch_size=4", "train.grad_accum=2"])
    cpu = Hardware(cuda=False, bf16=False, flash_attn=False, name="cpu")
    shape = step_shape(lengths, 4, 2, recipe.data.max_length, True)
    args = sft_config(recipe, choose_precision(recipe, cpu), cpu, tmp_path, False, shape)
    assert args.padding_free and not args.packing and args.per_device_train_batch_size == 1  # our own blocks
    assert args.gradient_accumulation_steps == shape.accum and shape.block_length == recipe.data.max_length
    flash = Precision(torch.bfloat16, True, False, "paged_adamw_8bit", "flash_attention_2")
    shape = step_shape(lengths, 4, 2, recipe.data.max_length, True, blocks_per_forward=4)
    args = sft_config(recipe, flash, cpu, tmp_path, False, shape)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == shape.per_device * shape.accum
    unpacked = load_recipe(recipe_factory(), ["data.packing=false", "train.micro_batch_size=4", "train.grad_accum=2"])
    shape = step_shape(lengths, 4, 2, unpacked.data.max_length, False)
    args = sft_config(unpacked, choose_precision(unpacked, cpu), cpu, tmp_path, False, shape)
    assert not args.packing and (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    grouped = load_recipe(recipe_factory(), ["data.packing=false", "data.group_by_length=true"])
    args = sft_config(grouped, choose_precision(grouped, cpu), cpu, tmp_path, False, shape)
    assert args.train_sampling_strategy == "group_by_length"
