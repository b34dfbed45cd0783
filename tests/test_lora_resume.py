"""Bit-identical resume for the LoRA variants that carry extra trained state (issue 18): a DoRA run (magnitude
vectors, their optimizer state) and a run with new tokens (trainable token rows of embed_tokens and lm_head, the
seeded resize of the embeddings). Same pattern as tests/test_reliability.py: a real `finetune train` subprocess is
killed with SIGKILL after step k, `--resume` finishes it, and every per-step (loss, lr) after the resume point and
every tensor of the final adapter equal the uninterrupted run's, bit for bit on this CPU.
"""

from __future__ import annotations

import signal

import pytest
import torch
from conftest import make_recipe
from test_lora_options import NEW_TEMPLATE
from test_reliability import SLOW_STEPS, assert_continues_like, cli, complete_steps, launch, wait_for_step

N = 8
TRAIN = {"max_steps": N, "micro_batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3, "save_steps": 2,
         "save_total_limit": 2, "report_to": ["none"], "gradient_checkpointing": False, "logging_steps": 1}


def _recipe(root, model_dir, kind: str):
    lora = {"r": 8, "alpha": 16, "dropout": 0.1}  # dropout on: the RNG state must be restored too
    if kind == "dora":
        return make_recipe(root, model_dir, train=TRAIN, lora={**lora, "use_dora": True})
    template = root / "newtok.jinja"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(NEW_TEMPLATE)
    return make_recipe(root, model_dir, train=TRAIN, lora=lora,
                       data={"template": str(template), "add_template_tokens": True, "add_tokens": ["<tool>"]})


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import finetune.guard  # noqa: F401 - transformers/trl log handlers bind to the real stderr (see test_reliability)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["dora", "new_tokens"])
def test_kill9_then_resume_is_bit_identical(tmp_path, tiny_model_dir, kind):
    from safetensors.torch import load_file

    recipe = _recipe(tmp_path / "r", tiny_model_dir, kind)
    a, b, log = tmp_path / "A", tmp_path / "B", tmp_path / "b.log"
    r = cli("train", recipe, f"output_dir={a}")
    assert r.exit_code == 0, r.output
    # the variant's own state is what is being resumed
    w = load_file(a / "adapter" / "adapter_model.safetensors")
    marker = "lora_magnitude_vector" if kind == "dora" else "trainable_tokens_delta"
    assert any(marker in k for k in w), sorted(w)[:8]

    proc = launch(["train", recipe, f"output_dir={b}"], log, inject=SLOW_STEPS)
    wait_for_step(b, 5, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (b / "adapter").exists()
    resumed_at = complete_steps(b)[-1]
    assert 2 <= resumed_at < N, resumed_at

    r = cli("train", recipe, f"output_dir={b}", "--resume")
    assert r.exit_code == 0, r.output
    assert_continues_like(a, b, resumed_at, N)
