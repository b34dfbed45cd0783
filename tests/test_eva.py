"""lora.init: eva (peft's EVA): LoRA A starts as the top right-singular vectors of each layer's inputs on the EVA
batches, and eva_rho redistributes the ranks across layers.

peft decomposes the inputs at supervised positions only (labels != -100), centred (its IncrementalPCA), cycles over
the batches until every layer's components stop moving, and skips a batch with fewer inputs than a layer's
components: on short replies, micro-batches of 4 examples never reached that and EVA looped forever. The EVA batches
are now grown to hold enough supervised tokens, and the loop is bounded (models.eva_init).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

R = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield


def _train_recording_batches(tmp, model_dir, **sections):
    """Train with init: eva; return (run, the EVA batches train built). lr 1e-12: the saved adapter is EVA's."""
    from conftest import make_recipe

    import finetune.train as train_mod
    from finetune.recipe import load_recipe

    seen = {}
    build = train_mod._eva_batches

    def spy(r, prepared):
        seen["batches"] = build(r, prepared)
        return seen["batches"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_eva_batches", spy)
        path = make_recipe(tmp, model_dir, **sections)
        run = train_mod.train(load_recipe(path), path)
    return run, seen["batches"]


@pytest.fixture(scope="module")
def eva_run(tmp_path_factory, tiny_model_dir):
    """One EVA batch of 8 examples (16 supervised tokens for round(4 x 2.0) = 8 components) on the 16-bit base."""
    from merged_run import one_thread

    with one_thread():
        return _train_recording_batches(
            tmp_path_factory.mktemp("eva"), tiny_model_dir,
            quantization={"load_in_4bit": False, "compute_dtype": "float32"},
            lora={"r": R, "alpha": 2 * R, "dropout": 0.0, "init": "eva", "eva_batches": 1},
            train={"max_steps": 1, "learning_rate": 1e-12, "micro_batch_size": 8})


def _layer_inputs(model_dir, tok, batches) -> dict[str, torch.Tensor]:
    """Every linear layer's inputs at the supervised positions of `batches`, captured from a fresh fp32 base."""
    from transformers import AutoModelForCausalLM

    from finetune.models import resize_for_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    resize_for_tokenizer(model, tok)
    inputs, keep = {}, None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.register_forward_hook(lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0][keep]))
    with torch.no_grad():
        for b in batches:
            keep = b["attention_mask"].bool() & (b["labels"] != -100)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return {name: torch.cat(xs).double() for name, xs in inputs.items()}


def test_eva_lora_a_rows_are_the_top_right_singular_vectors_of_the_layer_inputs(eva_run, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    run, batches = eva_run
    assert len(batches) == 1 and int((batches[0]["labels"] != -100).sum()) >= 2 * R
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    xs = _layer_inputs(tiny_model_dir, AutoTokenizer.from_pretrained(run / "adapter"), batches)
    checked = 0
    for name, x in xs.items():
        a = weights.get(f"base_model.model.{name}.lora_A.weight")
        if a is None:
            continue  # EVA gave this layer rank 0
        _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # peft's PCA centres the inputs
        k = a.shape[0]
        assert s[k - 1] > 1e-3 * s[0], f"{name}: the test's batch is too small for {k} components"
        cos = (a.double() * vh[:k]).sum(1).abs() / a.double().norm(dim=1)
        assert cos.min() > 0.999, f"{name}: |cos| of LoRA A rows with the top singular vectors {cos.tolist()}"
        checked += 1
    assert checked == 14


def test_eva_rho_redistributes_ranks(eva_run, tiny_model_dir):
    """rho 2 (the default): the saved rank_pattern moves rank between layers, the total kept and alpha scaled with
    it (peft's adjust_scaling_factors); rho 1 on the same batches keeps r everywhere."""
    from safetensors.torch import load_file

    from finetune.models import attach_lora
    from finetune.recipe import load_resolved

    run, batches = eva_run
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    ranks = cfg["rank_pattern"]
    assert ranks and set(ranks.values()) != {R} and max(ranks.values()) <= 2 * R
    assert cfg["alpha_pattern"] == {k: 2 * R * v / R for k, v in ranks.items() if v}
    rows = [v.shape[0] for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_A" in k]
    assert sum(rows) == 14 * R and sorted(set(rows)) != [R]  # 2 layers x 7 projections: the budget, redistributed
    recipe = load_resolved(run / "resolved.yaml")
    recipe = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"eva_rho": 1.0})})
    peft_model = attach_lora(_base(recipe, run, tiny_model_dir), recipe, False, eva_batches=batches)
    assert peft_model.peft_config["default"].rank_pattern == {}


def _base(recipe, run, model_dir):
    """The base as train loaded it for this run (tokenizer-aligned embeddings)."""
    from transformers import AutoTokenizer

    from finetune.hardware import choose_precision, detect_hardware
    from finetune.models import load_base, resize_for_tokenizer, resolve_base

    hw = detect_hardware("cpu")
    model = load_base(recipe, resolve_base(str(model_dir)), choose_precision(recipe, hw), hw)
    resize_for_tokenizer(model, AutoTokenizer.from_pretrained(run / "adapter"))
    return model


def test_eva_on_short_replies_converges(tmp_path, tiny_model_dir):
    """The recipe's defaults (r 8, rho 2, 8 batches, micro-batches of 4) on replies of 2 supervised tokens, a 4-bit
    base: peft needs 16 inputs per batch; before, every batch had 8, peft skipped them all and looped forever."""
    from finetune.models import eva_min_tokens
    from finetune.recipe import load_resolved

    run, batches = _train_recording_batches(tmp_path, tiny_model_dir, lora={"r": 8, "init": "eva"},
                                            train={"max_steps": 1})
    need = eva_min_tokens(load_resolved(run / "resolved.yaml").lora)
    assert need == 16 and len(batches) == 4  # 32 examples of 2 supervised tokens: 4 batches of 8 (not 8 of 4)
    assert all(int((b["labels"] != -100).sum()) >= need and b["input_ids"].shape[0] >= 4 for b in batches)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "lora.init: eva converged in" in (run / "train.log").read_text()


def test_eva_refusals_are_one_line(recipe_factory, eva_run, tiny_model_dir, monkeypatch):
    from finetune.cli import app
    from finetune.models import EvaError, attach_lora
    from finetune.recipe import load_resolved

    # Too few supervised tokens in the whole training set for r x rho components: refused, not looped on.
    result = CliRunner().invoke(app, ["train", str(recipe_factory(lora={"r": 64, "init": "eva"}))])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = next(ln for ln in result.output.splitlines() if "lora.init: eva" in ln)
    assert "at least 128 supervised tokens" in line and "has 64" in line
    # peft's loop has no bound of its own: ours names the way out.
    run, batches = eva_run
    recipe = load_resolved(run / "resolved.yaml")
    monkeypatch.setattr("finetune.models.EVA_MAX_PASSES", 0)
    with pytest.raises(EvaError, match="did not converge in 0 passes over 1 batches.*lora.init: default"):
        attach_lora(_base(recipe, run, tiny_model_dir), recipe, False, eva_batches=batches)
