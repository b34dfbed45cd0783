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


def test_adapter_gguf_negative_controls_fail_the_agreement_check(exported, tmp_path):
    """The right adapter passes; alpha doubled in the metadata, or A and B swapped (and transposed), fail."""
    from finetune.export.adapter_gguf import dense_base_dir, write_adapter_gguf
    from finetune.export.fidelity import check_adapter_gguf

    run, _ = exported
    tok, _, seqs = _ctx(run)
    seqs = seqs[:2]
    base_gguf = run / "export" / "gguf" / "run-base-f16.gguf"
    base_dir = dense_base_dir(run, tok, tmp_path)
    check = lambda lora: check_adapter_gguf(base_gguf, lora, base_dir, run / "adapter", seqs)  # noqa: E731
    good = check(write_adapter_gguf(run / "adapter", base_dir, tmp_path / "good.gguf").path)
    assert good["passed"], good
    wrong_alpha = check(write_adapter_gguf(run / "adapter", base_dir, tmp_path / "alpha.gguf", alpha=32.0).path)
    assert not wrong_alpha["passed"] and wrong_alpha["vs_same_base_weights"]["mean_kl"] > 100 * good[
        "vs_same_base_weights"]["mean_kl"]
    swapped = check(write_adapter_gguf(run / "adapter", base_dir, tmp_path / "swap.gguf", swap_ab=True).path)
    assert not swapped["passed"]


def test_k_quants_on_whole_super_blocks_are_llama_cpp_k_quant_tensors(tmp_path):
    """hidden 256: q4_k_m / q6_k / q2_k files hold real k-quant tensors, each passes the tight check in llama.cpp
    and the ladder orders them by bits."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from finetune.export.fidelity import build_ladder
    from finetune.export.gguf import write_gguf
    from finetune.export.quantize import quantize_gguf
    from finetune.templates import saved_template

    model_dir = build_tiny_llama(tmp_path / "m256", hidden=256, layers=1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    f16 = write_gguf(model_dir, tmp_path / "m-f16.gguf", "f16").path
    files = {"f16": f16}
    for t in ("q6_k", "q4_k_m", "q2_k"):
        files[t] = tmp_path / f"m-{t}.gguf"
        quantize_gguf(f16, files[t], t)
    kinds = {t: {x.tensor_type.name for x in GGUFReader(str(p)).tensors} for t, p in files.items()}
    assert "Q6_K" in kinds["q6_k"] and "Q4_K" in kinds["q4_k_m"] and "Q2_K" in kinds["q2_k"], kinds
    seqs = [tok("the quick brown fox jumps over a lazy dog what is the capital of france")["input_ids"]]
    ladder = build_ladder(model_dir, files, seqs, None, tok, saved_template("chatml", tok),
                          f16_bytes=f16.stat().st_size)
    rows = {r["type"]: r for r in ladder["rows"]}
    assert all(r["passed"] for r in rows.values()), {t: r.get("check") for t, r in rows.items()}
    assert rows["f16"]["mean_kl"] < rows["q6_k"]["mean_kl"] < rows["q4_k_m"]["mean_kl"] < rows["q2_k"]["mean_kl"]
    assert 6 < rows["q6_k"]["bits_per_weight"] < 8 and rows["q2_k"]["bits_per_weight"] < 4.5


def test_our_q8_0_writer_is_byte_identical_to_llama_cpp_quantizing_f32(tmp_path):
    from gguf import GGUFReader

    from finetune.export.gguf import write_gguf
    from finetune.export.quantize import quantize_gguf

    model_dir = build_tiny_llama(tmp_path / "m", hidden=64)
    ours = write_gguf(model_dir, tmp_path / "ours.gguf", "q8_0").path
    f32 = write_gguf(model_dir, tmp_path / "f32.gguf", "f32").path
    quantize_gguf(f32, tmp_path / "llama.gguf", "q8_0")
    read = lambda p: {t.name: (t.tensor_type.name, bytes(t.data)) for t in GGUFReader(str(p)).tensors}  # noqa: E731
    assert read(ours) == read(tmp_path / "llama.gguf")


def test_gguf_types_one_line_errors_and_recipe_accepts_one_or_several(tmp_path, recipe_factory):
    from finetune.cli import app
    from finetune.export import ExportError, gguf_types
    from finetune.export.quantize import ALL_TYPES
    from finetune.recipe import GGUFType, load_recipe
    from typing import get_args

    assert set(get_args(GGUFType)) == set(ALL_TYPES)
    assert gguf_types("q4_k_m") == ["q4_k_m"] and gguf_types(["f16", "q8_0", "f16"]) == ["f16", "q8_0"]
    with pytest.raises(ExportError) as e:
        gguf_types(["f16", "q4_km"])
    assert "'q4_km'" in str(e.value) and "q4_k_m" in str(e.value) and "\n" not in str(e.value)
    one = load_recipe(recipe_factory(export={"formats": ["gguf"], "gguf_type": "q4_k_m"}))
    several = load_recipe(recipe_factory(export={"formats": ["gguf"], "gguf_type": ["f16", "q5_k_m"]}))
    assert one.export.gguf_type == ["q4_k_m"] and several.export.gguf_type == ["f16", "q5_k_m"]
    result = RUNNER.invoke(app, ["export", str(tmp_path), "--format", "gguf", "--gguf-type", "f16", "q9_k"])
    assert result.exit_code == 2 and "q9_k" in result.output


def test_finetune_run_writes_the_ladder_when_the_recipe_lists_types(merged_run, monkeypatch):
    """stage_export verifies (the ladder) and hands export eval's first held-out generation task."""
    import finetune.export as export
    from finetune import pipeline
    from finetune.recipe import load_resolved

    run = merged_run[0]
    recipe = load_resolved(run / "resolved.yaml")
    calls = []
    monkeypatch.setattr(export, "export_run", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(export, "export_complete", lambda *a, **kw: False)
    for types, verify in ((["f16"], False), (["f16", "q4_k_m"], True)):
        r = recipe.model_copy(update={"export": recipe.export.model_copy(update={"formats": ["gguf"],
                                                                                 "gguf_type": types})})
        pipeline.stage_export(r, run)
        args, kw = calls[-1]
        assert args[2] == types and args[3] is verify
        assert (kw["task"] is not None) is verify
    task = calls[-1][1]["task"]
    assert task["name"] == "held_out" and task["metric"] == "exact_match"
    assert task["score"]("one", ["one"]) == 1.0 and task["score"]("one", [" two"]) == 0.0
