"""Merge and export on the real SmolLM2-135M-Instruct quickstart run (minutes on a CPU): `pytest -m slow`.

Runs the commands as a user would, from a directory other than the repository (the run's recipe names its
data with a path relative to the repository root; merge and export must not need it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _finetune(args, cwd, timeout=1800):
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_quickstart_merge_and_export_verified_in_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    run = tmp_path / "qs"
    _finetune(["train", "recipes/smollm2/135m_qlora_quickstart.yaml", "train.max_steps=2", f"output_dir={run}",
               "train.report_to=[none]"], cwd=REPO)

    merged = _finetune(["merge", str(run)], cwd=tmp_path)
    fid = json.loads((run / "merged" / "fidelity.json").read_text())
    assert fid["summary"] in merged.stdout
    assert fid["argmax_agreement"] >= 0.999 and fid["mean_kl"] <= 1e-4 and fid["probes"] == "8 held-out rows"

    exported = _finetune(["export", str(run), "--format", "gguf", "ollama", "adapter", "--verify"], cwd=tmp_path)
    ver = json.loads((run / "export" / "verify.json").read_text())
    assert ver["passed"] and ver["summary"] in exported.stdout
    assert ver["tokenisation"]["identical"] == ver["tokenisation"]["texts"]
    assert ver["vs_same_weights"]["argmax_agreement"] >= 0.99
    modelfile = (run / "export" / "gguf" / "Modelfile").read_text()
    assert "FROM ./qs-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    cfg = json.loads((run / "export" / "adapter" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"], "config.json").is_file()  # the dequantised builtin base
    report = (run / "report.md").read_text()
    assert "## Merge fidelity" in report and "## Export verification (llama.cpp)" in report
