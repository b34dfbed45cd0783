"""Packing (the recipe default): TRL's BFD packing + padding-free batches give, for every example, exactly the
logits and supervised labels it gets alone. Checked on the tiny 4-bit model with a non-identity LoRA."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("attention", ["sdpa", "per_example"])
def test_packed_logits_equal_per_example_logits(recipe_factory, attention):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.data.packing import pack, step_shape

    recipe = load_recipe(recipe_factory(rows=ROWS), ["data.packing=true", "data.max_length=64"])
    assert recipe.data.packing
    source = resolve_base(recipe.model.base)
    tok = load_tokenizer(recipe, source)
    template = load_template(recipe.data.template, tok)
    data = prepare(recipe, tok, template, use_cache=False).train
    hw = detect_hardware("cpu")
    base = load_base(recipe, source, choose_precision(recipe, hw), hw)
    if attention == "per_example":  # what training with packing uses (finetune/attention.py)
        from finetune import attention as per_example

        base.set_attn_implementation(per_example.register())
    model = attach_lora(base, recipe, False)
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


def test_per_example_attention_equals_the_block_diagonal_mask_with_gradients():
    """finetune.attention splits a packed row at its position_ids restarts and runs causal sdpa per example: the
    output and the gradients of q, k, v equal one sdpa call over the row with an explicit block-diagonal causal
    mask (built here directly from the example lengths), GQA included. Without restarts, or with a KV cache, it
    is transformers' sdpa unchanged."""
    from types import SimpleNamespace

    from finetune import attention

    torch.manual_seed(0)
    lengths = [5, 1, 9, 3, 14]
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 8
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    q = torch.randn(1, heads, total, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=True)
    out, _ = attention.packed_sdpa(module, q, k, v, None, position_ids=position_ids)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))

    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        mask[start:start + n, start:start + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        start += n
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                           attn_mask=mask).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum(), (q, k, v))
    assert out.shape == (1, total, heads, dim)
    assert (out - ref).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(grads, ref_grads))
    assert attention.segments(position_ids, total, total) == [[(0, 5), (5, 6), (6, 15), (15, 18), (18, 32)]]
    plain = torch.arange(total)[None]
    assert attention.segments(plain, total, total) is None  # one example: plain sdpa with the model's mask
    assert attention.segments(position_ids[:, -1:], 1, total) is None  # decoding with a KV cache


def test_training_with_packing_uses_per_example_attention(recipe_factory, tmp_path, monkeypatch):
    """A packed sdpa run trains with finetune.attention (each forward splits its row into examples); unpacked it
    does not."""
    from finetune import attention
    from finetune.train import train

    calls = {"split": 0}
    inner = attention.segments

    def counting(*a):
        spans = inner(*a)
        calls["split"] += spans is not None
        return spans

    monkeypatch.setattr(attention, "segments", counting)
    path = recipe_factory(rows=ROWS)
    for packing, expect in (("true", True), ("false", False)):
        calls["split"] = 0
        train(load_recipe(path, [f"data.packing={packing}", "train.max_steps=1", f"output_dir={tmp_path / packing}"]),
              path)
        assert (calls["split"] > 0) == expect, (packing, calls)
        manifest = json.loads((tmp_path / packing / "manifest.json").read_text())  # what ran, for the record
        assert manifest["precision"]["packed_attention"] == ("per_example" if expect else None)
    train(load_recipe(path, ["model.attn_implementation=sdpa", "train.max_steps=1", f"output_dir={tmp_path / 'sdpa'}"]),
          path)
    assert json.loads((tmp_path / "sdpa" / "manifest.json").read_text())["precision"]["packed_attention"] == "block_mask"
