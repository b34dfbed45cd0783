"""finetune merge: the merged model computes what the adapter computed on its NF4 base, and a wrong merge shows.

The run (conftest's session fixture merged_run, built in tests/merged_run.py) has a base with heavy-tailed
weights, so NF4's error is large, and LoRA B matrices perturbed after training, as peft's own merge tests
initialise LoRA to non-identity: a merge that ignored the adapter, or used the wrong weights, cannot pass.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner


RUNNER = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield


@pytest.fixture
def merged(merged_run):
    return merged_run


@pytest.fixture
def trained(merged_run):
    return merged_run


def _fidelity(run):
    return json.loads((run / "merged" / "fidelity.json").read_text())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def _probe_ids(tok):
    msgs = [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "one"}]
    return tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"] + tok.encode(" the quick fox")


def test_merged_equals_adapter_on_dequantized_base_and_differs_from_base(merged):
    """Reference built without our merge code: transformers' own bnb dequantize + PEFT's unmerged forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run, base = merged
    tok = AutoTokenizer.from_pretrained(run / "merged")
    ids = _probe_ids(tok)
    merged_model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    got = _logits(merged_model, ids)

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    deq = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32)
    deq = deq.dequantize(dtype=torch.float32)
    deq_base = _logits(deq, ids)
    ref = _logits(PeftModel.from_pretrained(deq, run / "adapter").eval(), ids)
    original = _logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ids)

    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, float(scale)), "merged != adapter on the dequantized base"
    assert (got - deq_base).abs().max() > 0.1, "the merge did not change the dequantized base"
    assert (got - original).abs().max() > 0.1, "merged logits equal the base model's"


def test_fidelity_report_meets_tolerance(merged):
    from finetune.rundir import merged_complete as merge_complete

    run, _ = merged
    fid = _fidelity(run)
    assert fid["base"] == "dequantized" and fid["dtype"] == "float32"
    assert fid["probes"] == "4 held-out rows"
    assert fid["argmax_agreement"] >= 0.999
    assert fid["mean_kl"] <= 1e-4
    assert fid["generation"]["identical"] == fid["generation"]["prompts"] == 4  # GEN_PROMPTS
    # The adapter really moved the model, by far more than the merge drifted.
    assert fid["adapter_vs_base_mean_kl"] > 1000 * max(fid["mean_kl"], 1e-9)
    assert "\n" not in fid["summary"] and fid["summary"].startswith("merge fidelity (dequantized base")
    report = (run / "report.md").read_text()
    assert "## Merge fidelity" in report and fid["summary"] in report
    assert merge_complete(run)


def test_merged_dir_is_a_plain_checkpoint_with_the_runs_template(merged):
    from transformers import AutoTokenizer

    run, _ = merged
    out = run / "merged"
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert list(out.glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos
    assert gen["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template == AutoTokenizer.from_pretrained(run / "adapter").chat_template


def test_wrong_merge_into_original_weights_is_measurably_worse(merged, tmp_path):
    """--base original (through the CLI): the report shows the NF4 error the merge carried in."""
    from finetune.cli import app

    run, _ = merged
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("merged"))
    result = RUNNER.invoke(app, ["merge", str(copy), "--base", "original"])
    assert result.exit_code == 0, result.output
    assert "merge fidelity (original base" in result.output
    good, bad = _fidelity(run), _fidelity(copy)
    assert bad["mean_kl"] > 1e-3 and bad["mean_kl"] > 1000 * max(good["mean_kl"], 1e-9)
    assert bad["max_abs_dlogit"] > 100 * good["max_abs_dlogit"]
    assert bad["argmax_agreement"] < good["argmax_agreement"]


def test_refuses_to_merge_into_a_4bit_model(trained):
    from finetune.hardware import detect_hardware
    from finetune.merge import MergeError, _load_with_adapter, merge_lora, read_run

    run, _ = trained
    model = _load_with_adapter(read_run(run), detect_hardware("cpu"), quantized=True)
    with pytest.raises(MergeError, match="still 4-bit in memory.*rounded away"):
        merge_lora(model)


def test_bnb_cpu_repack_is_caught(trained):
    """bitsandbytes repacks NF4 layers (bf16 scales) on a CPU inference forward; that must never be merged."""
    from bitsandbytes.functional import has_avx512bf16

    from finetune.hardware import detect_hardware
    from finetune.merge import _load_with_adapter, read_run
    from finetune.models import NF4LayoutError, dequantize_4bit_layers

    if not has_avx512bf16():
        pytest.skip("bitsandbytes only repacks on CPUs with AVX512-BF16")
    run, _ = trained
    model = _load_with_adapter(read_run(run), detect_hardware("cpu"), quantized=True)
    for m in model.modules():  # undo keep_training_nf4_layout, as a careless caller would
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(NF4LayoutError, match="repacked"):
        dequantize_4bit_layers(model, torch.float32)


def test_merge_complete_follows_the_adapter(merged, tmp_path):
    from merged_run import reseal_adapter

    from finetune.rundir import merged_complete as merge_complete

    run, _ = merged
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert merge_complete(copy)
    cfg = copy / "adapter" / "adapter_config.json"
    cfg.write_text(cfg.read_text() + "\n")  # a different adapter from the one merged
    reseal_adapter(copy / "adapter")  # ... written whole, as train would (not a damaged file)
    assert not merge_complete(copy)
    # eval refuses to score a merge of another adapter as "the fine-tuned model", before loading anything.
    from finetune.evaluate import EvalError, evaluate_run

    with pytest.raises(EvalError, match="no merged model of the current adapter"):
        evaluate_run(copy, model="merged", echo=lambda m: None)


def test_merge_user_errors_are_one_line(tmp_path, merged):
    from finetune.cli import app

    result = RUNNER.invoke(app, ["merge", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no finished adapter" in result.output and "Traceback" not in result.output
    run, _ = merged
    result = RUNNER.invoke(app, ["merge", str(run), "--base", "nf4"])
    assert result.exit_code == 2 and "--base: must be one of dequantized, original" in result.output
