"""A packed optimizer step holds as many examples, on average, as an unpacked one (issue 19): the same steps per
epoch, so the learning-rate schedule and the number of updates mean what the recipe says."""

from __future__ import annotations

import json
import random

import pytest

from finetune.data.packing import assign, pack, packed_blocks, step_shape


def mixed_lengths(n: int, seed: int = 0) -> list[int]:
    """Short and long instruction rows, like real SFT data (most short, a tail of long ones)."""
    rng = random.Random(seed)
    return [min(256, int(rng.lognormvariate(4.0, 0.6)) + 8) for _ in range(n)]


@pytest.mark.parametrize("micro,accum,max_length", [(8, 1, 256), (4, 4, 256), (2, 8, 512), (1, 16, 1024), (16, 2, 256)])
def test_packed_steps_per_epoch_match_unpacked(micro, accum, max_length):
    lengths = mixed_lengths(400)
    shape = step_shape(lengths, micro, accum, max_length, packing=True)
    blocks = assign(lengths, shape.rows, max_length)
    # Independent checks on the blocks themselves: every example once, none over max_length.
    assert sorted(i for b in blocks for i in b) == list(range(400)) and len(blocks) == shape.rows
    assert max(sum(lengths[i] for i in b) for b in blocks) <= max_length
    steps = -(-shape.rows // (shape.per_device * shape.accum))
    assert steps == shape.steps_per_epoch
    assert abs(steps - shape.unpacked_steps_per_epoch) <= max(1, shape.unpacked_steps_per_epoch / 20), shape
    assert shape.examples_per_step == pytest.approx(micro * accum, rel=0.06)
    # Still packed: fewer forward rows than examples (the padding-free speed-up stays), and well filled.
    assert shape.rows < len(lengths) or micro * accum == 1
    fill = sum(lengths) / (shape.rows * max_length)
    assert fill > 0.5 or shape.per_device * shape.accum == micro * accum, fill


def test_pack_keeps_every_token_and_label_and_marks_example_boundaries():
    import datasets

    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    ids = [[100 * i + j for j in range(n)] for i, n in enumerate(lengths)]
    labels = [[-100] * (n // 2) + row[n // 2:] for n, row in zip(lengths, ids)]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    shape = step_shape(lengths, 2, 2, 16, packing=True)
    packed = pack(ds, shape)
    assert len(packed) == shape.rows
    seen = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= 16
        start = 0
        for n in row["seq_lengths"]:
            example = row["input_ids"][start:start + n]
            i = example[0] // 100
            assert example == ids[i] and row["labels"][start:start + n] == labels[i]
            seen.append(i)
            start += n
    assert sorted(seen) == list(range(len(lengths)))
    assert shape.fill == pytest.approx(sum(len(r) for r in packed["input_ids"]) / (len(packed) * 16), abs=1e-4)

def test_naive_packing_would_change_the_meaning_of_a_step():
    """The bug this fixes: max_length blocks counted as micro-batch rows hold ~3x the examples per step."""
    lengths = mixed_lengths(400)
    naive_blocks = packed_blocks(lengths, 256)
    assert 400 / naive_blocks > 2.5  # several examples per block, so counting blocks as rows triples a step
    shape = step_shape(lengths, 8, 1, 256, packing=True)
    assert shape.steps_per_epoch == 50 and -(-naive_blocks // 8) < 25


def test_unpacked_shape_is_the_recipe():
    shape = step_shape([10] * 100, 4, 2, 64, packing=False)
    assert (shape.per_device, shape.accum, shape.steps_per_epoch, shape.block_length) == (4, 2, 13, 64)


def test_flash_attention_keeps_several_blocks_per_forward():
    lengths = mixed_lengths(400)
    sdpa = step_shape(lengths, 16, 2, 256, packing=True)
    flash = step_shape(lengths, 16, 2, 256, packing=True, blocks_per_forward=16)
    assert sdpa.per_device == 1 and flash.per_device > 1
    assert flash.per_device * flash.accum == sdpa.per_device * sdpa.accum


def _optimizer_steps(run) -> int:
    return json.loads((run / "manifest.json").read_text())["global_step"]


def test_training_takes_the_same_steps_per_epoch_packed_and_unpacked(recipe_factory, tmp_path, capsys):
    """The real trainer on the tiny model: one epoch, packed and unpacked, the same number of optimizer steps."""
    from merged_run import one_thread
    from tiny import color_rows

    from finetune.recipe import load_recipe
    from finetune.train import train

    rows = color_rows(96)
    common = ["train.max_steps=null", "train.epochs=1", "train.micro_batch_size=4", "train.grad_accum=2",
              "data.max_length=128", "data.held_out=0"]
    steps = {}
    with one_thread():
        for packing in ("true", "false"):
            path = recipe_factory(rows=rows)
            out = tmp_path / f"run-{packing}"
            run = train(load_recipe(path, common + [f"data.packing={packing}", f"output_dir={out}"]), path)
            steps[packing] = _optimizer_steps(run)
            report = json.loads((run / "data_report.json").read_text())["steps"]
            assert report["steps_per_epoch"] == steps[packing]
            assert "examples per step" in (run / "report.md").read_text()
            printed = capsys.readouterr().out  # what `finetune train` shows before the first step
            assert f"{report['examples_per_step']} examples per step" in printed
            assert f"{steps[packing]} steps per epoch" in printed
    assert steps["false"] == 96 // 8
    assert abs(steps["true"] - steps["false"]) <= max(1, steps["false"] // 20), steps
