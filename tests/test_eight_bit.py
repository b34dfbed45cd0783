"""quantization.load_in_8bit (LLM.int8 base): training, merge, the merge's fidelity reference, the PEFT adapter.

bitsandbytes runs a Linear8bitLt two ways (models.eight_bit_training_path): in training on a CPU, the int8 weights
dequantised and multiplied in fp32; in eval mode (and on CUDA always), LLM.int8 with int8-rounded activations. The
adapter learned against the first, so merge measures against it, and reports the LLM.int8 inference path beside it
with its floor. One tiny run (module fixture), LoRA B perturbed after training as in tests/merged_run.py, so a
merge that drops the adapter cannot meet the limits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def eight_bit_run(tmp_path_factory, tiny_model_dir):
    """(run, the training model after training, its LoRA A at attach time)."""
    from conftest import make_recipe
    from merged_run import one_thread, perturb_lora_b

    import finetune.train as train_mod
    from finetune.merge import merge_run
    from finetune.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("eight-bit")
    seen = {}
    attach = train_mod.attach_lora

    def spy(*args, **kwargs):
        seen["model"] = model = attach(*args, **kwargs)
        seen["lora_A"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        return model

    with one_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "attach_lora", spy)
        path = make_recipe(tmp, tiny_model_dir, quantization={"load_in_8bit": True, "compute_dtype": "float32"},
                           data={"held_out": 4})
        run = train_mod.train(load_recipe(path), path)
        shutil.copytree(run / "adapter", tmp / "adapter-trained")
        perturb_lora_b(run / "adapter")
        merge_run(run)
    return run, seen["model"], seen["lora_A"]


def _int8_layers(model):
    import bitsandbytes as bnb

    return {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m for n, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear8bitLt)}


def _fidelity(run):
    return json.loads((run / "merged" / "fidelity.json").read_text())


def test_8bit_base_trains_lora_and_keeps_its_int8_weights(eight_bit_run, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run, model, lora_a_at_start = eight_bit_run
    trained = _int8_layers(model)
    assert len(trained) == 14  # all-linear on 2 layers x 7 projections
    fresh = _int8_layers(AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32))
    for name, layer in trained.items():
        assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        assert torch.equal(layer.weight.data, fresh[name].weight.data), f"{name}: int8 weights changed"
        assert torch.equal(scb, fresh[name].weight.SCB), f"{name}: row scales changed"
    moved = [n for n, p in model.named_parameters() if "lora_A" in n and not torch.equal(p, lora_a_at_start[n])]
    assert len(moved) == len(lora_a_at_start) == 14, "LoRA A did not train"
    w = load_file(run.parent / "adapter-trained" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in w.items() if "lora_B" in k), "LoRA B did not leave zero"


def test_bnb_8bit_cpu_training_path_is_dequantised_fp32():
    """What the merge reference rests on: in training on a CPU, a Linear8bitLt computes x @ dequant(W).T in fp32;
    in eval mode it is LLM.int8 (int8 activations), another function of x."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import int8_vectorwise_dequant

    from finetune.models import eight_bit_training_path

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False, has_fp16_weights=False).to("cpu")
    model = torch.nn.Sequential(layer).eval()
    x = torch.randn(5, 64) * 3
    with torch.no_grad():
        int8_path = layer(x)
        with eight_bit_training_path(model) as n:
            fp_path = layer(x)
    assert n == 1 and not layer.training
    dense = x @ int8_vectorwise_dequant(layer.weight.data, layer.state.SCB).T
    assert (fp_path - dense).abs().max() <= 1e-5
    assert (int8_path - dense).abs().max() > 1e-3


def test_8bit_merge_meets_its_stated_limits(eight_bit_run):
    from finetune.merge import INT8_FLOOR_FACTOR, MAX_MEAN_KL, MIN_ARGMAX

    run, _, _ = eight_bit_run
    fid = _fidelity(run)
    int8 = fid["int8"]
    assert int8["within_limits"], fid["summary"]
    assert int8["trained_on"] == "cpu" and "CPU training path" in fid["reference"]
    assert fid["mean_kl"] <= MAX_MEAN_KL and fid["argmax_agreement"] >= MIN_ARGMAX
    assert int8["limits"] == {"mean_kl": MAX_MEAN_KL, "argmax_agreement": MIN_ARGMAX,
                              "runtime_mean_kl": INT8_FLOOR_FACTOR * int8["floor"]["mean_kl"]}
    # LLM.int8 inference differs from the merged model by about what it differs from the dequantised base alone:
    # int8 activations, not the merge. Against that path a 1e-4 limit would fail every correct merge.
    assert 1e-4 < int8["floor"]["mean_kl"] and int8["runtime"]["mean_kl"] <= int8["limits"]["runtime_mean_kl"]
    assert fid["adapter_vs_base_mean_kl"] > 100 * int8["limits"]["runtime_mean_kl"]
    assert fid["generation"]["identical"] == fid["generation"]["prompts"]
    assert "\n" not in fid["summary"] and "within the limits" in fid["summary"]
    assert fid["summary"] in (run / "report.md").read_text()


def test_8bit_merge_that_drops_the_adapter_fails_the_limits(eight_bit_run, tmp_path, monkeypatch):
    import finetune.merge as merge_mod

    run, _, _ = eight_bit_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    monkeypatch.setattr(merge_mod, "merge_lora", lambda model: model.unload())  # the dequantised base, no delta
    merge_mod.merge_run(copy)
    fid = _fidelity(copy)
    assert not fid["int8"]["within_limits"] and "OUTSIDE the limits" in fid["summary"]
    assert fid["mean_kl"] > 100 * fid["int8"]["limits"]["mean_kl"]
    assert fid["int8"]["runtime"]["mean_kl"] > 100 * fid["int8"]["limits"]["runtime_mean_kl"]


def test_8bit_adapter_in_plain_peft_gives_the_training_time_logits(eight_bit_run, tiny_model_dir):
    """Plain transformers + PeftModel on an 8-bit base, no code of ours: with the 8-bit layers in training mode (the
    path training ran) it equals merged/; in eval mode (LLM.int8) it is off by the floor the report states."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune.merge import compare_logits

    run, _, _ = eight_bit_run
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    msgs = [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "one"}]
    x = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    with torch.no_grad():
        want = merged(input_ids=x).logits[0]
        llm_int8 = model(input_ids=x).logits[0]
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear8bitLt):
                m.train()
        got = model(input_ids=x).logits[0]
        with model.disable_adapter():
            base_logits = model(input_ids=x).logits[0]
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert (got - base_logits).abs().max() > 0.5, "the adapter did not change the logits"
    kl = compare_logits([llm_int8], [want])["mean_kl"]
    assert 1e-5 < kl <= _fidelity(run)["int8"]["limits"]["runtime_mean_kl"]
