"""The quickstart recipe on the real SmolLM2-135M-Instruct (builtin GGUF): 2 NF4 steps. Slow: `pytest -m slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_two_steps(tmp_path):
    out_dir = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", "recipes/smollm2/135m_qlora_quickstart.yaml",
                           "train.max_steps=2", f"output_dir={out_dir}", "train.report_to=[none]"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["base"]["spec"] == "builtin:smollm2-135m-instruct"
    base = AutoModelForCausalLM.from_pretrained(manifest["base"]["hf_path"])
    model = PeftModel.from_pretrained(base, out_dir / "adapter")
    assert model.peft_config["default"].r == 16
    assert "bfloat16 is not used on CPU" in proc.stderr  # the loud fallback
    assert "<|im_end|>" in (out_dir / "adapter" / "chat_template.jinja").read_text()
