"""Data: formats, sources, held-out split, cache, too_long, and one-line errors for malformed files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import make_recipe
from finetune.data import DataError, prepare
from finetune.recipe import load_recipe
from finetune.templates import load_template
from tiny import color_rows, write_jsonl

CHAT = [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "one"}]


def _prep(recipe_path, tok, template="chatml", use_cache=False):
    r = load_recipe(recipe_path)
    return prepare(r, tok, load_template(r.data.template if template is None else template), use_cache=use_cache)


def _decoded_train(prepared, tok):
    return [tok.decode(ids) for ids in prepared.train["input_ids"]]


FORMAT_ROWS = {
    "alpaca": {"instruction": "what is red", "input": "", "output": "one"},
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "what is red"}, {"from": "gpt", "value": "one"}]},
    "prompt_completion": {"prompt": "what is red", "completion": "one"},
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_ROWS))
def test_formats_render_the_same_conversation(fmt, tmp_path, tiny_model_dir, tiny_tokenizer):
    p = make_recipe(tmp_path, tiny_model_dir, rows=[FORMAT_ROWS[fmt]],
                    data={"train": [{"path": str(tmp_path / "train.jsonl"), "format": fmt}], "template": "chatml"})
    out = _prep(p, tiny_tokenizer)
    assert _decoded_train(out, tiny_tokenizer) == [
        "<|im_start|>user\nwhat is red<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n"]
    labels = out.train["labels"][0]
    assert tiny_tokenizer.decode([t for t in labels if t != -100]) == "one<|im_end|>"


def test_text_format_supervises_everything_with_eos(tmp_path, tiny_model_dir, tiny_tokenizer):
    p = make_recipe(tmp_path, tiny_model_dir, rows=[{"text": "hello world"}],
                    data={"train": [{"path": str(tmp_path / "train.jsonl"), "format": "text"}]})
    out = _prep(p, tiny_tokenizer)
    ids, labels = out.train["input_ids"][0], out.train["labels"][0]
    assert tiny_tokenizer.decode(ids) == "hello world</s>" and labels == ids  # this tokenizer adds no BOS


def test_multi_turn_messages_with_system(tmp_path, tiny_model_dir, tiny_tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."}] + CHAT +
           [{"role": "user", "content": "and blue"}, {"role": "assistant", "content": "three"}]}
    p = make_recipe(tmp_path, tiny_model_dir, rows=[row],
                    data={"train": [{"path": str(tmp_path / "train.jsonl"), "format": "messages"}]})
    labels = _prep(p, tiny_tokenizer).train["labels"][0]
    spans = tiny_tokenizer.decode([t for t in labels if t != -100])
    assert spans == "one<|im_end|>three<|im_end|>"


def test_column_mapping(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"question": "what is red", "answer": "one"}]
    p = make_recipe(tmp_path, tiny_model_dir, rows=rows, data={"train": [{
        "path": str(tmp_path / "train.jsonl"), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}]})
    assert "what is red" in _decoded_train(_prep(p, tiny_tokenizer), tiny_tokenizer)[0]


def test_csv_parquet_json_and_directory_sources(tmp_path, tiny_model_dir, tiny_tokenizer):
    import pandas as pd

    d = tmp_path / "mixed"
    d.mkdir()
    pd.DataFrame([{"instruction": "csv row", "input": "", "output": "one"}]).to_csv(d / "a.csv", index=False)
    pd.DataFrame([{"instruction": "parquet row", "input": "", "output": "two"}]).to_parquet(d / "b.parquet")
    (d / "c.json").write_text(json.dumps([{"instruction": "json row", "input": "", "output": "three"}]))
    write_jsonl(d / "d.jsonl", [{"instruction": "jsonl row", "input": "", "output": "four"}])
    p = make_recipe(tmp_path, tiny_model_dir, data={"train": [{"path": str(d), "format": "alpaca"}]})
    texts = " ".join(_decoded_train(_prep(p, tiny_tokenizer), tiny_tokenizer))
    for word in ("csv row", "parquet row", "json row", "jsonl row"):
        assert word in texts


def test_mixing_weight_and_max_samples(tmp_path, tiny_model_dir, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "input": "", "output": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "input": "", "output": "y"} for i in range(10)])
    p = make_recipe(tmp_path, tiny_model_dir, data={"train": [{"path": str(a), "max_samples": 4},
                                                             {"path": str(b), "weight": 2.0}]})
    out = _prep(p, tiny_tokenizer)
    assert out.report["rows_per_source"] == {str(a): 4, str(b): 10}
    assert out.report["rows"]["train"] == 4 + 20


def test_held_out_split_deterministic_disjoint_saved(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = color_rows(40) + color_rows(40)[:5]  # 5 exact duplicates
    p = make_recipe(tmp_path, tiny_model_dir, rows=rows, data={"held_out": 0.25})
    a, b = _prep(p, tiny_tokenizer), _prep(p, tiny_tokenizer)
    held_a = [e.messages for e in a.held_out]
    assert held_a == [e.messages for e in b.held_out] and len(held_a) == 10
    train_texts = set(_decoded_train(a, tiny_tokenizer))
    for m in held_a:
        rendered = tiny_tokenizer.apply_chat_template(m, chat_template=load_template("chatml").source, tokenize=False)
        assert rendered not in train_texts
    assert a.report["duplicates"]["rows_with_identical_rendered_text"] == 5
    other = make_recipe(tmp_path / "s2", tiny_model_dir, rows=rows, data={"held_out": 0.25}, train={"seed": 7})
    assert [e.messages for e in _prep(other, tiny_tokenizer).held_out] != held_a


def test_held_out_saved_in_run_dir_by_data_command(tmp_path, tiny_model_dir):
    p = make_recipe(tmp_path, tiny_model_dir, rows=color_rows(20), data={"held_out": 5})
    out = subprocess.run([sys.executable, "-m", "finetune", "data", str(p), "--no-color"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import re

    assert "15 train rows, 5 held out" in out.stdout
    assert re.search(r"\[\[(one|two|three|four)<\|im_end\|>\]\]", out.stdout), "supervised span marked when piped"
    held = [json.loads(x) for x in (tmp_path / "run" / "held_out.jsonl").read_text().splitlines()]
    assert len(held) == 5 and all(h["loc"].startswith(str(tmp_path / "train.jsonl") + ":") for h in held)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows"] == {"train": 15, "held_out": 5}
    for key in ("length_percentiles", "supervised_fraction", "trl_packing_efficiency", "padded_efficiency", "truncated"):
        assert key in report


def _trl_packed_blocks(token_lists: list[list[int]], max_length: int) -> int:
    """How many blocks TRL's SFTTrainer packs these rows into (packing_strategy="bfd", its default map batching)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    return len(pack_dataset(Dataset.from_dict({"input_ids": token_lists}), max_length, strategy="bfd"))


def test_trl_packing_efficiency_counts_trls_packed_blocks(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The baseline beside our packing: the fill of the blocks TRL's own packing makes: tokens / (blocks x max_length)."""
    import random

    from finetune.data import trl_packing_efficiency

    p = make_recipe(tmp_path, tiny_model_dir, rows=color_rows(40), data={"max_length": 64})
    prepared = _prep(p, tiny_tokenizer)
    ids = prepared.train["input_ids"]
    blocks = _trl_packed_blocks(ids, 64)
    assert 1 < blocks < len(ids), "the tiny rows pack several to a block"
    assert prepared.report["trl_packing_efficiency"] == pytest.approx(sum(map(len, ids)) / (blocks * 64))
    # Thousands of rows of mixed lengths, some over max_length (TRL truncates them), packed 1000 rows per map batch
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(1, 60), rng.randint(100, 512), rng.randint(400, 700)]) for _ in range(2500)]
    blocks = _trl_packed_blocks([[1] * n for n in lengths], 512)
    assert trl_packing_efficiency(lengths, 512) == pytest.approx(sum(min(n, 512) for n in lengths) / (blocks * 512))
    assert trl_packing_efficiency([], 512) == 0.0


def test_cache_hit_and_misses(tmp_path, tiny_model_dir, tiny_tokenizer):
    import shutil

    from transformers import AutoTokenizer

    p = make_recipe(tmp_path, tiny_model_dir, rows=color_rows(8))
    first = _prep(p, tiny_tokenizer, use_cache=True)
    second = _prep(p, tiny_tokenizer, use_cache=True)
    assert first.report["cache"]["hit"] is False and second.report["cache"]["hit"] is True
    assert first.train["input_ids"] == second.train["input_ids"]
    # a different template: miss
    assert _prep(p, tiny_tokenizer, template="zephyr", use_cache=True).report["cache"]["hit"] is False
    # a changed tokenizer file (same name/path, different contents): miss
    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    changed = AutoTokenizer.from_pretrained(tok_dir)
    assert _prep(p, changed, use_cache=True).report["cache"]["hit"] is False
    # changed data: miss
    write_jsonl(tmp_path / "train.jsonl", color_rows(9))
    assert _prep(p, tiny_tokenizer, use_cache=True).report["cache"]["hit"] is False
    # changed max_length: miss
    r = yaml.safe_load(p.read_text())
    r["data"]["max_length"] = 32
    p.write_text(yaml.safe_dump(r))
    assert _prep(p, tiny_tokenizer, use_cache=True).report["cache"]["hit"] is False


@pytest.mark.parametrize("policy", ["truncate", "drop", "error"])
def test_too_long_policy(policy, tmp_path, tiny_model_dir, tiny_tokenizer):
    long_prompt = {"instruction": " ".join(["word"] * 80), "input": "", "output": "one"}
    long_reply = {"instruction": "hi", "input": "", "output": " ".join(["two"] * 80)}
    p = make_recipe(tmp_path, tiny_model_dir, rows=color_rows(4) + [long_prompt, long_reply],
                    data={"too_long": policy, "max_length": 32})
    if policy == "error":
        with pytest.raises(DataError, match=r"train.jsonl:5: example is longer than data.max_length=32"):
            _prep(p, tiny_tokenizer)
        return
    out = _prep(p, tiny_tokenizer)
    if policy == "truncate":
        # the long reply is cut but kept; the long prompt has no supervised token left: dropped and counted
        assert (out.report["truncated"], out.report["dropped"]["count"], out.report["rows"]["train"]) == (2, 1, 5)
        assert "train.jsonl:5: no supervised token left" in out.report["dropped"]["first"][0]
    else:
        assert (out.report["truncated"], out.report["dropped"]["count"], out.report["rows"]["train"]) == (0, 2, 4)
    assert all(len(ids) <= 32 for ids in out.train["input_ids"])


def test_pad_is_not_eos_and_decapoda_fix(tmp_path, tiny_model_dir):
    """A decapoda-style conversion: misspelled class, empty bos/eos, config ids 0/1. Detected and fixed."""
    import shutil

    from finetune.models import align_special_ids, load_tokenizer, resolve_base
    from finetune.recipe import validate_recipe
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "decapoda"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg.update({"tokenizer_class": "LLaMATokenizer", "bos_token": "", "eos_token": ""})
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    mcfg = json.loads((bad / "config.json").read_text())
    mcfg.update({"bos_token_id": 0, "eos_token_id": 1})
    (bad / "config.json").write_text(json.dumps(mcfg))
    recipe = validate_recipe({"model": {"base": str(bad)}, "data": {"train": [{"path": "tatsu-lab/alpaca"}]},
                              "output_dir": str(tmp_path / "r")})
    tok = load_tokenizer(recipe, resolve_base(str(bad)))
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(bad)
    fixes = align_special_ids(tok, model)
    assert any("bos_token_id" in f for f in fixes) and any("eos_token_id" in f for f in fixes)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert tok.eos_token_id in (model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])


def test_packed_logits_equal_per_example_logits(tiny_model_dir, tiny_tokenizer):
    """Packing: attention never crosses example boundaries (position_ids restart, no KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in
                ("what is red one", "the quick brown fox jumps over a lazy dog", "hello")]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": e} for e in examples])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e]), use_cache=False).logits[0] for e in examples])
        # and the control: without restarting positions the packed logits differ (attention crosses)
        crossed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()
    assert not torch.allclose(crossed, alone, atol=1e-3)
