"""The LoRA options of the recipe (rsLoRA, DoRA, init, modules_to_save, layers_to_transform, rank/alpha patterns),
new tokens that learn (data.add_tokens / add_template_tokens) and the 8-bit base.

One combined NF4 run (module fixture `variant_run`) uses DoRA + rsLoRA + rank/alpha patterns + modules_to_save
[lm_head] + new template tokens; after training its DoRA magnitudes, LoRA B, new token rows and the saved lm_head
are perturbed (as peft's merge tests initialise to non-identity), so a merge that drops or mis-merges any variant
cannot meet the fidelity thresholds, and each variant also has its own check on the merged weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

RUNNER = CliRunner()
END = "<|end|>"
NEW_TEMPLATE = """{#- finetune
models: tests (turn markers the tiny base lacks)
end_of_turn: <|end|>
requires: [<|user|>, <|assistant|>, <|end|>]
-#}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{{- '<|assistant|>\\n' -}}{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}{{- '\\n' -}}
{%- else -%}
{{- '<|user|>\\n' + message['content'] + '<|end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>\\n' -}}
{%- endif -%}
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield


def _template(tmp: Path) -> str:
    path = tmp / "newtok.jinja"
    path.write_text(NEW_TEMPLATE)
    return str(path)


def _perturb(adapter: Path, seed: int = 0) -> None:
    """Non-identity adapter: every trained tensor moved clearly (B, DoRA magnitudes, token rows, saved modules)."""
    from merged_run import reseal_adapter
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    t = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for k, v in t.items():
        if "lora_B" in k or "trainable_tokens_delta" in k:
            t[k] = v + 0.1 * torch.randn(v.shape, generator=g)
        elif "lora_magnitude_vector" in k:
            t[k] = v * (1 + 0.5 * torch.rand(v.shape, generator=g))
        elif k.startswith("base_model.model.lm_head.") and "original_module" not in k:
            t[k] = v + 0.2 * torch.randn(v.shape, generator=g)  # the saved copies of the trained head
    save_file(t, path, metadata={"format": "pt"})
    reseal_adapter(adapter)


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory, tiny_model_dir):
    from conftest import make_recipe
    from merged_run import one_thread

    from finetune.merge import merge_run
    from finetune.recipe import load_recipe
    from finetune.train import train

    tmp = tmp_path_factory.mktemp("variants")
    with one_thread():
        path = make_recipe(
            tmp, tiny_model_dir,
            lora={"r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True, "use_rslora": True,
                  "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"], "layers_to_transform": [1],
                  "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"o_proj": 4}, "modules_to_save": ["lm_head"]},
            data={"template": _template(tmp), "add_template_tokens": True, "held_out": 4})
        run = train(load_recipe(path), path)
        shutil.copytree(run / "adapter", tmp / "adapter-trained")
        _perturb(run / "adapter")
        merge_run(run)
    return run, tmp


def _cfg(run: Path) -> dict:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())


def _weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def test_recipe_options_reach_the_saved_adapter(variant_run):
    run, tmp = variant_run
    cfg = _cfg(run)
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["layers_to_transform"] == [1]
    assert cfg["rank_pattern"] == {"v_proj": 4} and cfg["alpha_pattern"] == {"o_proj": 4}
    assert cfg["modules_to_save"] == ["lm_head"]
    w = _weights(tmp / "adapter-trained")
    lora = [k for k in w if "lora_" in k]
    assert lora and all(".layers.1." in k for k in lora), "layers_to_transform: layer 0 must not be adapted"
    assert w["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape[0] == 4  # rank_pattern
    assert w["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    assert any("lora_magnitude_vector" in k for k in w)  # DoRA
    assert any("lm_head.modules_to_save" in k for k in w)  # modules_to_save
    # new tokens: only the input embedding's rows (lm_head is trained in full through modules_to_save)
    tok_idx = cfg["trainable_token_indices"]
    assert list(tok_idx) == ["embed_tokens"] and len(tok_idx["embed_tokens"]) == 3


def test_rslora_and_alpha_pattern_scaling(tiny_model_dir, recipe_factory):
    """rsLoRA scales by alpha/sqrt(r); alpha_pattern overrides alpha: read from peft's layers."""
    from finetune.hardware import choose_precision, detect_hardware
    from finetune.models import attach_lora, load_base, resolve_base
    from finetune.recipe import load_recipe

    recipe = load_recipe(recipe_factory(lora={"r": 16, "alpha": 8, "use_rslora": True, "alpha_pattern": {"o_proj": 2},
                                              "target_modules": ["q_proj", "o_proj"]}))
    hw = detect_hardware("cpu")
    model = attach_lora(load_base(recipe, resolve_base(str(tiny_model_dir)), choose_precision(recipe, hw), hw),
                        recipe, False)
    layer = model.base_model.model.model.layers[0].self_attn
    assert layer.q_proj.scaling["default"] == pytest.approx(8 / 16 ** 0.5)
    assert layer.o_proj.scaling["default"] == pytest.approx(2 / 16 ** 0.5)


def test_merge_of_every_variant_meets_fidelity_thresholds(variant_run):
    run, _ = variant_run
    fid = json.loads((run / "merged" / "fidelity.json").read_text())
    assert fid["mean_kl"] <= 1e-4 and fid["argmax_agreement"] >= 0.999, fid["summary"]
    assert fid["adapter_vs_base_mean_kl"] > 1000 * max(fid["mean_kl"], 1e-9)


def _merged(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)


def test_dora_merged_with_its_magnitudes(variant_run):
    """DoRA's merged weight has row norms equal to its magnitude vector (plain-LoRA merge would not)."""
    run, _ = variant_run
    w = _weights(run / "adapter")
    merged = _merged(run).state_dict()
    for proj in ("self_attn.q_proj", "mlp.down_proj"):
        mag = w[f"base_model.model.model.layers.1.{proj}.lora_magnitude_vector"]
        norms = merged[f"model.layers.1.{proj}.weight"].norm(dim=1)
        assert torch.allclose(norms, mag, rtol=1e-4), f"{proj}: merged rows do not carry DoRA's magnitudes"


def test_new_token_rows_and_modules_to_save_merged(variant_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = variant_run
    w = _weights(run / "adapter")
    merged = _merged(run).state_dict()
    ids = _cfg(run)["trainable_token_indices"]["embed_tokens"]
    rows = w["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(merged["model.embed_tokens.weight"][ids], rows), "new token rows not merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    n = base["model.embed_tokens.weight"].shape[0]
    assert torch.equal(merged["model.embed_tokens.weight"][:n], base["model.embed_tokens.weight"]), "old rows changed"
    from peft import PeftModel

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fresh.resize_token_embeddings(merged["lm_head.weight"].shape[0])
    head = PeftModel.from_pretrained(fresh, run / "adapter").base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(merged["lm_head.weight"], head), "modules_to_save lm_head not merged"
    assert (head[:n] - base["lm_head.weight"]).abs().max() > 0.1
    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert tok.convert_tokens_to_ids(END) in ids and len(tok) == merged["model.embed_tokens.weight"].shape[0]


def test_adapter_loads_in_plain_peft_with_the_merged_logits(variant_run, tiny_model_dir):
    """Plain transformers + PeftModel, no code of ours: the adapter on the dequantized NF4 base equals merged/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run, _ = variant_run
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    ids = tok.apply_chat_template([{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "one"}],
                                  tokenize=True, return_dict=True)["input_ids"]
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    deq = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, dtype=torch.float32)
    deq = deq.dequantize(dtype=torch.float32)
    deq.resize_token_embeddings(len(tok))
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(deq, run / "adapter").eval()(input_ids=x).logits[0]
        got = _merged(run)(input_ids=x).logits[0]
    assert (ref - got).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------
# New tokens that learn


def test_new_tokens_only_new_rows_train_and_end_token_is_learned(tmp_path, tiny_model_dir):
    from conftest import make_recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data import render_ids_and_mask
    from finetune.recipe import load_recipe
    from finetune.templates import load_template
    from finetune.train import train

    path = make_recipe(tmp_path, tiny_model_dir, data={"template": _template(tmp_path), "add_template_tokens": True,
                                                       "add_tokens": ["<tool>"]},
                       train={"max_steps": 24, "learning_rate": 3e-2})
    run = train(load_recipe(path), path)
    tok = AutoTokenizer.from_pretrained(run / "adapter")  # the tokenizer with the new tokens, saved with the adapter
    new = [tok.convert_tokens_to_ids(t) for t in ("<tool>", "<|user|>", "<|assistant|>", END)]
    base_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert min(new) >= len(base_tok) and tok.encode(END, add_special_tokens=False) == [new[-1]]
    cfg = _cfg(run)["trainable_token_indices"]
    assert sorted(cfg["embed_tokens"]) == sorted(cfg["lm_head"]) == sorted(new)
    # The end token is supervised ...
    msgs = [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "one"}]
    ids, mask = render_ids_and_mask(msgs, tok, load_template(str(tmp_path / "newtok.jinja"), tok))
    k = max(i for i, m in enumerate(mask) if m)
    assert ids[k] == new[-1], "the last supervised token is not the new end token"
    # ... and learned: the trained rows (not the resize init) make <|end|> likely after a reply.
    from peft import PeftModel

    from finetune.models import resize_for_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    resize_for_tokenizer(base, tok)
    x = torch.tensor([ids[:k]])
    with torch.no_grad():
        before = base(input_ids=x).logits[0, -1].softmax(-1)[new[-1]]
        model = PeftModel.from_pretrained(base, run / "adapter").eval()
        after = model(input_ids=x).logits[0, -1].softmax(-1)[new[-1]]
    assert after > 0.3 and after > 20 * before, (float(before), float(after))
    # Only the new rows train: the wrapped layers' own rows are the base's.
    w = _weights(run / "adapter")
    orig = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    n = len(base_tok)
    for key, name in (("model.embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        assert torch.equal(w[f"base_model.model.{key}.token_adapter.base_layer.weight"][:n], orig[name])
        assert w[f"base_model.model.{key}.token_adapter.trainable_tokens_delta"].shape[0] == len(new)
    assert not any("lora" in k and "embed" in k for k in w)


def test_template_tokens_missing_without_add_is_refused_naming_the_fix(recipe_factory, tmp_path):
    from finetune.cli import app

    result = RUNNER.invoke(app, ["train", str(recipe_factory(data={"template": _template(tmp_path)}))])
    assert result.exit_code == 2 and "data.add_template_tokens: true" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Refusals, before anything loads


@pytest.mark.parametrize("sections, field, says", [
    ({"lora": {"init": "pissa"}}, "lora.init", "on a 4-bit base use init: default, gaussian, eva or loftq"),
    ({"lora": {"init": "olora"}, "quantization": {"load_in_8bit": True}}, "lora.init", "8-bit base"),
    ({"lora": {"init": "loftq"}, "quantization": {"load_in_4bit": False}}, "lora.init", "load_in_4bit: true"),
    ({"lora": {"init": "loftq", "use_dora": True}}, "lora.use_dora", "init: default, gaussian or eva"),
    ({"lora": {"layers_to_transform": [0]}}, "lora", "target_modules as a list"),
    ({"quantization": {"load_in_4bit": True, "load_in_8bit": True}}, "quantization", "choose one"),
    ({"lora": {"init": "svd"}}, "lora.init", "must be one of"),
    ({"lora": {"rank_pattern": {"q_proj": 0}}}, "lora.rank_pattern", "positive"),
])
def test_unsupported_combinations_refused_in_one_line(recipe_factory, sections, field, says):
    from finetune.cli import app

    result = RUNNER.invoke(app, ["validate", str(recipe_factory(**sections))])
    assert result.exit_code == 2, result.output
    line = next(ln for ln in result.output.splitlines() if field + ":" in ln)
    assert says in line and "Traceback" not in result.output


def test_loftq_on_a_cpu_is_refused_naming_the_hardware(recipe_factory):
    from finetune.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = RUNNER.invoke(app, ["train", str(recipe_factory(lora={"init": "loftq"}))])
    assert result.exit_code == 2 and "lora.init: loftq" in result.output and "CUDA" in result.output
    assert "Traceback" not in result.output
