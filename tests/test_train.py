"""`finetune train` on the tiny fixture with real NF4 layers: the adapter loads, LoRA moved, the base did not."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_recipe
from tiny import color_rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("train")
    before = _sha(tiny_model_dir / "model.safetensors")
    recipe = make_recipe(tmp, tiny_model_dir, rows=color_rows(16), data={"held_out": 4},
                         train={"max_steps": 12, "learning_rate": 2e-2, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                                "report_to": ["tensorboard"]})
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"run": tmp / "run", "stdout": out.stdout, "stderr": out.stderr, "base_sha_before": before,
            "model_dir": tiny_model_dir}


def test_run_directory_contents(trained):
    run = trained["run"]
    for name in ("resolved.yaml", "manifest.json", "data_report.json", "held_out.jsonl", "train.log",
                 "train_log.jsonl", "loss.png", "report.md", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer_config.json"):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["versions"]["transformers"] and manifest["device"] == "cpu"
    assert len(manifest["recipe_sha256"]) == 64 and all(len(h) == 64 for h in manifest["data_sha256"].values())
    assert manifest["precision"] == {"compute_dtype": "float32", "bf16": False, "fp16": False,
                                     "optimizer": "adamw_torch", "attn_implementation": "sdpa",
                                     "packed_attention": "per_example", "gradient_checkpointing": False,
                                     "gradient_checkpointing_why": "off (train.gradient_checkpointing: false)"}
    assert "- gradient checkpointing off (train.gradient_checkpointing: false)" in (run / "report.md").read_text()
    # the run's template travels with the adapter
    template = (Path(__file__).parent.parent / "data_templates" / "chatml.jinja").read_text()
    assert (run / "adapter" / "chat_template.jinja").read_text() == template
    assert "data: 12 train rows, 4 held out" in trained["stdout"]
    assert "[[" in trained["stdout"], "the summary shows the supervised span of an example"
    assert "## Training" in (run / "report.md").read_text()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard logs in the run directory"


def test_loss_goes_down(trained):
    logs = [json.loads(x) for x in (trained["run"] / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert any("eval_loss" in r for r in logs), "held-out loss is logged"


def test_adapter_loads_lora_changed_base_frozen(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, model_dir = trained["run"], trained["model_dir"]
    assert _sha(model_dir / "model.safetensors") == trained["base_sha_before"]
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), "only LoRA weights are trained and saved"
    assert all(v.dtype == torch.float32 for v in saved.values()), "adapter trained in fp32, not TRL's bf16 cast"
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero and must have moved"

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, run / "adapter")
    for name, tensor in model.base_model.model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(tensor, reference[plain]), name


def test_refuses_to_overwrite_finished_adapter(trained):
    recipe = trained["run"].parent / "recipe.yaml"
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "already holds a finished adapter" in out.stderr and "Traceback" not in out.stderr


def test_bad_data_row_is_one_line(tmp_path, tiny_model_dir):
    rows = color_rows(4)
    del rows[2]["output"]
    recipe = make_recipe(tmp_path, tiny_model_dir, rows=rows)
    out = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'train.jsonl'}:3: missing field 'output'")
    assert "Traceback" not in out.stderr


def test_held_out_eval_during_training_keeps_the_training_kernel(trained):
    """bitsandbytes repacks NF4 layers for a bf16 CPU kernel on the first eval-mode forward; after that,
    training would run through gemv_4bit, which has no autograd kernel and silently drops gradients.
    The effect itself is checked below (test_gradients_after_an_eval_forward_equal_the_dequantized_reference);
    here: the run did evaluate in the middle of training, and bitsandbytes never warned about the kernel."""
    logs = [json.loads(x) for x in (trained["run"] / "train_log.jsonl").read_text().splitlines()]
    last_train_step = max(r["step"] for r in logs if "loss" in r)
    assert any("eval_loss" in r and r["step"] < last_train_step for r in logs), "no held-out eval mid-training"
    assert "gemv_4bit" not in trained["stderr"]


def test_gradients_after_an_eval_forward_equal_the_dequantized_reference(tiny_model_dir):
    """What keep_training_nf4_layout protects, checked on its effect (the failure is silent): after an eval-mode
    forward without gradients, as a held-out evaluation during training runs, the training loss and every LoRA
    gradient of the 4-bit model still equal those of the same LoRA on dequant(NF4(W)) in fp32."""
    from finetune.hardware import choose_precision, detect_hardware
    from finetune.models import attach_lora, dequantize_4bit_layers, load_base, resolve_base
    from finetune.recipe import validate_recipe

    r = validate_recipe({"model": {"base": str(tiny_model_dir)}, "data": {"train": [{"path": "tatsu-lab/alpaca"}]},
                         "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0}, "output_dir": "x"})
    hw = detect_hardware("cpu")
    precision = choose_precision(r, hw)

    def lora_model(dense: bool):
        base = load_base(r, resolve_base(str(tiny_model_dir)), precision, hw)
        if dense:
            assert dequantize_4bit_layers(base, torch.float32) > 0
        return attach_lora(base, r, gradient_checkpointing=False)

    model, reference = lora_model(dense=False), lora_model(dense=True)
    gen = torch.Generator().manual_seed(0)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:  # the same non-identity LoRA on both (lora_B starts at zero)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                ref_params[name].copy_(p)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=gen)

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the held-out evaluation
    results = []
    for m in (model, reference):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if "lora_" in n}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_4bit_base_is_never_repacked_by_inference(tiny_model_dir):
    import bitsandbytes as bnb

    from finetune.hardware import choose_precision, detect_hardware
    from finetune.models import load_base, resolve_base
    from finetune.recipe import validate_recipe

    r = validate_recipe({"model": {"base": str(tiny_model_dir)}, "data": {"train": [{"path": "tatsu-lab/alpaca"}]},
                         "quantization": {"compute_dtype": "float32"}, "output_dir": "x"})
    hw = detect_hardware("cpu")
    model = load_base(r, resolve_base(str(tiny_model_dir)), choose_precision(r, hw), hw).eval()
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = layer.weight.quant_state.absmax.clone()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 7, 9]]))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.quant_state.absmax, before)
