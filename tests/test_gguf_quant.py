"""Quantized GGUFs by llama.cpp's own quantizer, the fidelity ladder, and the LoRA adapter as a GGUF.

Every file is opened and evaluated by llama.cpp (llama-cpp-python). The tiny session run (merged_run, hidden 64)
covers the command end to end; k-quants need rows of whole 256-value super-blocks (llama.cpp falls back to
q5_0/q8_0 for hidden 64), so a hidden-256 tiny model checks the real k-quant tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tiny import build_tiny_llama

llama_cpp = pytest.importorskip("llama_cpp", reason="CI installs llama-cpp-python for the GGUF tests")

RUNNER = CliRunner()
TYPES = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def exported(merged_run):
    """`finetune export RUN --format gguf gguf_adapter ollama --gguf-type f16 q8_0 q4_k_m --verify`."""
    from finetune.cli import app

    run = merged_run[0]
    result = RUNNER.invoke(app, ["export", str(run), "--format", "gguf", "gguf_adapter", "ollama",
                                 "--gguf-type", *TYPES, "--verify"])
    return run, result


def _ctx(run):
    from transformers import AutoTokenizer

    from finetune.export import _probes_for_verify
    from finetune.recipe import load_resolved
    from finetune.templates import saved_template

    tok = AutoTokenizer.from_pretrained(run / "merged")
    template = saved_template(load_resolved(run / "resolved.yaml").data.template, tok)
    return tok, template, _probes_for_verify(run, tok, template)[0]


def test_export_writes_every_type_the_ladder_and_the_adapter(exported):
    from gguf import GGUFReader

    run, result = exported
    assert result.exit_code == 0, result.output
    folder = run / "export" / "gguf"
    record = json.loads((run / "export" / "export.json").read_text())["formats"]
    assert record["gguf"]["gguf_types"] == TYPES
    for t in TYPES:
        assert (folder / f"run-{t}.gguf").is_file()
    assert record["gguf"]["made"]["q4_k_m"]["by"].startswith("llama.cpp's quantizer")
    assert record["gguf"]["made"]["q4_k_m"]["peak_rss_bytes"] > 0
    kinds = {t.tensor_type.name for t in GGUFReader(str(folder / "run-q4_k_m.gguf")).tensors}
    assert kinds - {"F32", "F16"}, kinds  # quantized tensors, not a copy of the f16 file
    ver = json.loads((run / "export" / "verify.json").read_text())
    rows = {r["type"]: r for r in ver["ladder"]["rows"]}
    assert list(rows) == TYPES + ["base+lora"]
    assert all(r["passed"] for r in rows.values()), [(k, r.get("vs_same_weights")) for k, r in rows.items()]
    assert ver["passed"]
    # each type costs what its bits say: f16 is nearly exact, q4_k_m is smaller and further away
    assert rows["f16"]["mean_kl"] < rows["q8_0"]["mean_kl"] < rows["q4_k_m"]["mean_kl"]
    assert rows["q4_k_m"]["file_bytes"] < rows["q8_0"]["file_bytes"] < rows["f16"]["file_bytes"]
    ref = ver["ladder"]["reference"]
    assert ref["task"] == "held_out" and ref["metric"] == "exact_match" and ref["prompts"] >= 4
    assert all("task_value" in r and "delta_vs_base" in r for r in rows.values())
    assert ref["base_source"] == "llama.cpp, base GGUF"
    # the table in report.md and on stdout
    table = ver["ladder"]["table"]
    assert "| q4_k_m |" in table and table.splitlines()[0] in (run / "report.md").read_text()
    assert "q4_k_m: " in result.output and "of f16's size" in result.output
    # the adapter layout llama.cpp expects, and Ollama's ADAPTER line
    lora = GGUFReader(str(folder / "run-lora.gguf"))
    fields = {k: f.contents() for k, f in lora.fields.items() if k.startswith(("general.type", "adapter."))}
    assert fields == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 16.0}
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in lora.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8) and shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)
    mf = (folder / "Modelfile.adapter").read_text()
    assert "FROM ./run-base-f16.gguf\nADAPTER ./run-lora.gguf\n" in mf
    assert ver["ladder"]["adapter"]["passed"]


def test_ladder_numbers_equal_a_direct_computation(exported):
    """KL, top-1 and bits per weight recomputed here from llama.cpp's and HF's logits (torch, not our code)."""
    from transformers import AutoModelForCausalLM

    run, _ = exported
    tok, template, seqs = _ctx(run)
    row = {r["type"]: r for r in json.loads((run / "export" / "verify.json").read_text())["ladder"]["rows"]}["q4_k_m"]
    path = run / "export" / "gguf" / "run-q4_k_m.gguf"
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, type_k=0, type_v=0, verbose=False)
    kls, agree = [], []
    try:
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([ids])).logits[0].double()
            kls.append(torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                  reduction="none").sum(-1))
            agree.append(got.argmax(-1) == ref.argmax(-1))
    finally:
        llm.close()
    kl, top1 = torch.cat(kls), torch.cat(agree).double()
    assert row["positions"] == kl.numel()
    assert row["mean_kl"] == pytest.approx(kl.mean().item(), rel=1e-3, abs=1e-7)
    assert row["max_kl"] == pytest.approx(kl.max().item(), rel=1e-3, abs=1e-7)
    assert row["top1_agreement"] == pytest.approx(top1.mean().item())
    n = sum(p.numel() for p in model.parameters())
    assert row["bits_per_weight"] == pytest.approx(8 * path.stat().st_size / n, rel=1e-6)
