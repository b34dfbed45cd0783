"""`finetune plan`: published QLoRA figures, exact parameter/optimizer bytes of real CPU models, and the
activation model against the profiler's measured peak."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from finetune import plan as P
from finetune.cli import app
from finetune.hardware import choose_precision, detect_hardware
from finetune.memory import model_bytes, optimizer_bytes, step_peak_bytes
from finetune.models import attach_lora, load_base, resolve_base
from finetune.recipe import load_recipe

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: with two threads, most of the time goes to waiting for the other
    thread to be scheduled."""
    from merged_run import one_thread

    with one_thread():
        yield


PAPER = P.Setup(seq_len=512, batch=1, lora_r=64, target_modules="all-linear", optimizer="paged_adamw_8bit",
                gradient_checkpointing=True, compute="bf16")
"""The QLoRA paper's setting: r=64 on every linear layer, bf16 compute, paged 8-bit AdamW, checkpointing."""


def test_llama_65b_finetunes_under_48gb():
    plan = P.estimate(P.SHAPES["llama-65b"], PAPER, gpu_memory=48 * P.GIB)
    assert plan.fits
    assert 38 * P.GIB < plan.total < 48 * P.GIB  # fits, but not trivially: the 4-bit base alone is ~31 GiB
    assert not P.estimate(P.SHAPES["llama-65b"], replace(PAPER, load_in_4bit=False), 48 * P.GIB).fits


def test_llama_7b_nf4_base_is_about_5gb():
    plan = P.estimate(P.SHAPES["llama-7b"], PAPER)
    base = plan.part("base") + plan.part("kept")
    assert 4.0e9 < base < 5.5e9
    # Double quantisation saves 0.373 bits per quantised parameter (QLoRA paper, section 3).
    n = 32 * sum(a * b for _, a, b in P.SHAPES["llama-7b"].linears())
    no_dq = P.estimate(P.SHAPES["llama-7b"], replace(PAPER, double_quant=False)).part("base")
    assert (no_dq - plan.part("base")) * 8 / n == pytest.approx(0.373, abs=0.005)
    assert no_dq * 8 / n == pytest.approx(4.5, abs=0.01)  # 4 bits + one fp32 absmax per 64 weights


def _loaded(recipe_path, overrides=()):
    recipe = load_recipe(recipe_path, list(overrides))
    hw = detect_hardware("cpu")
    precision = choose_precision(recipe, hw)
    model = load_base(recipe, resolve_base(recipe.model.base), precision, hw)
    model = attach_lora(model, recipe, recipe.train.gradient_checkpointing)
    for p in model.parameters():  # what train.keep_adapter_fp32 does
        if p.requires_grad:
            p.data = p.data.float()
    return recipe, model


def _assert_exact(recipe, model, batch=2, seq=16):
    plan = P.plan_recipe(recipe, None, device="cpu")
    got = model_bytes(model)
    assert got == {k: plan.part(k) for k in got}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert optimizer_bytes(opt) == plan.part("optimizer")
    assert sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad) == plan.part("grads")


@pytest.mark.parametrize("overrides", [
    (),
    ("quantization.double_quant=false", "lora.r=4", "lora.target_modules=[q_proj,v_proj,down_proj]"),
])
def test_exact_bytes_tiny(recipe_factory, overrides):
    recipe, model = _loaded(recipe_factory(), overrides)
    _assert_exact(recipe, model)


@pytest.mark.slow
def test_exact_bytes_smollm2(tmp_path):
    recipe, model = _loaded("recipes/smollm2/135m_qlora_quickstart.yaml", [f"output_dir={tmp_path / 'run'}"])
    _assert_exact(recipe, model, batch=1, seq=8)


@pytest.mark.parametrize("ckpt,dropout,chunked", [(False, 0.0, False), (True, 0.0, False), (False, 0.1, False),
                                                   (True, 0.1, False), (False, 0.0, True), (True, 0.1, True)])
def test_activation_estimate_matches_profiler(recipe_factory, ckpt, dropout, chunked):
    """LoRA dropout gives every adapted linear its own saved input: without its term the plan was 30% low on
    SmolLM2 without checkpointing (bench/RESULTS.md). chunked: the loss as our SFT runs compute it (TRL's fused
    LM head served by finetune/loss.py), against the plan's chunked logits term."""
    recipe, model = _loaded(recipe_factory(), [f"train.gradient_checkpointing={str(ckpt).lower()}",
                                                f"lora.dropout={dropout}"])
    model.config.use_cache = False
    model.train()
    if chunked:
        from trl.trainer.utils import add_fused_lm_head

        from finetune.loss import install

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        assert install(model)
    measured = step_peak_bytes(model, batch=4, seq=48, fused=chunked)
    plan = P.plan_recipe(recipe, None, device="cpu", batch=4, seq_len=48, chunked_loss=chunked)
    estimated = plan.part("activations")
    assert estimated == pytest.approx(measured, rel=0.05)


def test_sharding_and_processes():
    shape = P.SHAPES["llama-2-70b"]
    one = P.estimate(shape, PAPER)
    ddp = P.estimate(shape, replace(PAPER, num_processes=2, sharding="ddp"))
    fsdp = P.estimate(shape, replace(PAPER, num_processes=2, sharding="fsdp"))
    off = P.estimate(shape, replace(PAPER, num_processes=2, sharding="fsdp_offload"))
    assert ddp.part("base") == one.part("base") and ddp.part("ddp") == one.part("grads")
    w = P.weight_parts(shape, PAPER)  # the packed 4-bit data is sharded, its constants stay whole on every rank
    assert fsdp.part("base") == w["four_bit"] // 2 + w["quant_state"] and w["base"] == one.part("base")
    assert fsdp.part("kept") < one.part("kept") // 2  # also 16-bit: sharded runs skip the fp32 upcast
    assert off.part("base") == off.part("optimizer") == 0 and off.total < fsdp.total < one.total
    assert off.part("gathered") > 0


# Where each Setup field the advice may change is named in the advice's text.
ADVICE_NAMES = {"gradient_checkpointing": "train.gradient_checkpointing", "optimizer": "train.optimizer",
                "batch": "micro_batch_size", "seq_len": "data.max_length", "sharding": "offload",
                "num_processes": "GPUs"}


def _advice_cases():
    """(shape, setup, memory) that do not fit, one for each kind of advice."""
    s7 = P.Setup(seq_len=512, batch=1, optimizer="adamw_torch")
    optimizer_only = (P.estimate(P.SHAPES["llama-2-7b"], s7).total
                      + P.estimate(P.SHAPES["llama-2-7b"], replace(s7, optimizer="paged_adamw_8bit")).total) // 2
    return [
        ("llama-3-8b", P.Setup(seq_len=2048, batch=8, gradient_checkpointing=False), 24 * P.GIB),  # + micro-batch
        ("llama-2-7b", s7, optimizer_only),
        ("llama-3-8b", P.Setup(seq_len=16384, batch=1), 24 * P.GIB),  # shorter sequences
        ("llama-2-70b", P.Setup(seq_len=2048, batch=1, num_processes=2, sharding="fsdp"), 16 * P.GIB),  # offload
        ("llama-2-70b", P.Setup(seq_len=2048, batch=1), 24 * P.GIB),  # more GPUs
    ]


@pytest.mark.parametrize("case", range(5))
def test_advice_names_a_change_that_fits(case):
    """Re-planned with the advised changes applied, the run fits, at the total the advice's last line states,
    and every change is named in the advice."""
    name, setup, memory = _advice_cases()[case]
    plan = P.estimate(P.SHAPES[name], setup, memory)
    assert not plan.fits and plan.advice and plan.advised_changes
    fixed = P.estimate(P.SHAPES[name], replace(setup, **plan.advised_changes), memory)
    assert fixed.fits
    assert plan.advice[-1].removesuffix(" per GPU").endswith(f": {P.fmt(fixed.total)}")
    for changed in plan.advised_changes:
        assert ADVICE_NAMES[changed] in " ".join(plan.advice)
    if not setup.gradient_checkpointing:
        assert "gradient checkpointing" in plan.advice[0]  # the cheapest change comes first


def test_advice_when_nothing_fits():
    plan = P.estimate(P.SHAPES["llama-65b"], P.Setup(seq_len=2048, batch=1), 2 * P.GIB)
    assert plan.advised_changes is None and "use a smaller model" in plan.advice[-1]


def test_shape_from_local_config_and_gguf(tiny_model_dir):
    shape, source = P.resolve_shape(str(tiny_model_dir))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert (shape.hidden, shape.layers, shape.vocab) == (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    assert "config.json" in source
    from finetune.models import builtin_gguf

    gguf_shape, _ = P.resolve_shape(str(builtin_gguf("smollm2-135m-instruct")))
    assert replace(gguf_shape, name="x") == replace(P.SHAPES["smollm2-135m"], name="x")
    with pytest.raises(P.PlanError, match="--shape"):
        P.resolve_shape("someone/unknown-model")


def test_parse_size():
    assert P.parse_size("24GiB") == P.parse_size("24GB") == P.parse_size("24") == 24 * P.GIB
    assert P.parse_size("40960MiB") == 40 * P.GIB
    with pytest.raises(P.PlanError):
        P.parse_size("lots")


def test_cli_plan(recipe_factory):
    runner = CliRunner()
    path = str(recipe_factory())
    ok = runner.invoke(app, ["plan", path, "--gpu-memory", "1GiB"])
    assert ok.exit_code == 0, ok.output
    assert "4-bit base" in ok.output and "fits in" in ok.output
    small = runner.invoke(app, ["plan", path, "--gpu-memory", "1MiB", "--json"])
    assert small.exit_code == 1
    data = json.loads(small.output)
    assert data["fits"] is False and data["advice"]
    bad = runner.invoke(app, ["plan", path, "--gpu-memory", "a lot"])
    assert bad.exit_code == 2 and "--gpu-memory" in bad.output
    cfg = runner.invoke(app, ["plan", path, "--accelerate-config", "recipes/accelerate/fsdp_qlora.yaml", "--json"])
    setup = json.loads(cfg.output)["setup"]
    assert (setup["num_processes"], setup["sharding"]) == (2, "fsdp")


def test_gradient_checkpointing_auto_follows_the_plan(recipe_factory):
    """auto (the default) turns checkpointing off only when the plan without it fits with room to spare."""
    from finetune.hardware import Hardware

    auto = load_recipe(recipe_factory(), ["train.gradient_checkpointing=auto"])
    from finetune.recipe import TrainSection

    assert TrainSection().gradient_checkpointing == "auto"  # the default
    roomy = P.plan_recipe(auto, 80 * P.GIB)
    assert roomy.setup.gradient_checkpointing is False and roomy.notes[0].startswith("gradient checkpointing auto: off")
    # Llama-3-8B in bf16, seq 2048 x 1 on 24 GiB: ~32 GiB without checkpointing, so auto keeps it on (~14 GiB).
    bf16 = load_recipe(recipe_factory(), ["train.gradient_checkpointing=auto", "quantization.compute_dtype=bfloat16"])
    tight = P.plan_recipe(bf16, 24 * P.GIB, shape="llama-3-8b", seq_len=2048, batch=1)
    assert tight.setup.gradient_checkpointing is True and tight.fits and "on (without it" in tight.notes[0]
    without = P.estimate(P.SHAPES["llama-3-8b"], replace(tight.setup, gradient_checkpointing=False))
    assert without.total > 0.8 * 24 * P.GIB
    # An explicit value is never second-guessed.
    forced = load_recipe(recipe_factory(), ["train.gradient_checkpointing=true"])
    assert P.plan_recipe(forced, 80 * P.GIB).setup.gradient_checkpointing is True
    assert P.plan_recipe(forced, 80 * P.GIB).notes == []

    cpu = Hardware(cuda=False, bf16=False, flash_attn=False, name="cpu")
    ckpt, why = P.checkpointing_for_run(auto, cpu)  # this machine's available RAM
    assert ckpt is False and "available RAM" in why  # the tiny model needs a few MiB
    gpu = Hardware(cuda=True, bf16=True, flash_attn=False, name="a GPU")
    ckpt, why = P.checkpointing_for_run(auto, gpu, memory=24 * P.GIB)
    assert ckpt is False and "GPU memory" in why
    for hw in (cpu, gpu):
        ckpt, why = P.checkpointing_for_run(auto, hw, memory=1024)
        assert ckpt is True and why.startswith("on (without it the run would need")
        assert P.checkpointing_for_run(forced, hw, memory=1024) == (True, "on (train.gradient_checkpointing: true)")


def test_gpu_without_bf16_plans_fp32(recipe_factory):
    """On a GPU without bf16 (T4, V100) hardware.choose_precision computes in fp32: the plan's activations and
    its dequantised weight follow that dtype, not bf16's, and so does `gradient_checkpointing: auto`."""
    from finetune.hardware import Hardware

    overrides = ["quantization.compute_dtype=bfloat16", "train.gradient_checkpointing=false"]
    recipe = load_recipe(recipe_factory(), overrides)
    kw = dict(shape="llama-2-7b", seq_len=2048, batch=1)
    with_bf16, without = P.plan_recipe(recipe, None, **kw), P.plan_recipe(recipe, None, bf16=False, **kw)
    assert (with_bf16.setup.compute, without.setup.compute) == ("bf16", "fp32")
    assert without.part("activations") == P.activation_bytes(P.SHAPES["llama-2-7b"], without.setup)
    # bf16 autocast keeps the residual stream and the MLP in fp32, so fp32 stores more but not twice as much.
    assert without.part("activations") > 1.1 * with_bf16.part("activations")
    assert without.part("transient") == 2 * with_bf16.part("transient")
    assert "falls back to float32" in " ".join(without.notes) and with_bf16.notes == []

    # Memory whose 80% lies between the two runs without checkpointing: auto turns it off only where bf16 is.
    memory = int((with_bf16.total + without.total) / 2 / P.AUTO_CKPT_FRACTION["cuda"])
    auto = load_recipe(recipe_factory(), [overrides[0], "train.gradient_checkpointing=auto"])
    assert P.plan_recipe(auto, memory, **kw).setup.gradient_checkpointing is False
    assert P.plan_recipe(auto, memory, bf16=False, **kw).setup.gradient_checkpointing is True
    # train() decides through checkpointing_for_run with the detected GPU (the tiny model's shape here).
    tiny = [P.plan_recipe(recipe, None, bf16=bf16) for bf16 in (True, False)]
    memory = int((tiny[0].total + tiny[1].total) / 2 / P.AUTO_CKPT_FRACTION["cuda"])
    for bf16, ckpt in ((True, False), (False, True)):
        gpu = Hardware(cuda=True, bf16=bf16, flash_attn=False, name="a GPU")
        assert P.checkpointing_for_run(auto, gpu, memory=memory)[0] is ckpt
