"""finetune export: GGUF checked in llama.cpp (an independent runtime), the Modelfile's template, the adapter.

The run is conftest's session fixture merged_run (tests/merged_run.py); every GGUF test runs llama.cpp
through llama-cpp-python.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from tiny import build_tiny_llama

llama_cpp = pytest.importorskip("llama_cpp", reason="CI installs llama-cpp-python for the GGUF tests")

RUNNER = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from merged_run import one_thread

    with one_thread():
        yield
TWO_TURNS = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": "what is red"}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "and green? 😀 naïve"}]


@pytest.fixture
def run(merged_run):
    return merged_run[0]


@pytest.fixture(scope="module")
def exported(merged_run):
    """The command the issue names, run once: `finetune export RUN --format gguf ollama adapter --verify`."""
    from finetune.cli import app

    run = merged_run[0]
    result = RUNNER.invoke(app, ["export", str(run), "--format", "gguf", "ollama", "adapter", "--verify"])
    return run, result


def _seqs_and_texts(run):
    from transformers import AutoTokenizer

    from finetune.export import _probes_for_verify
    from finetune.templates import saved_template
    from finetune.recipe import load_resolved

    tok = AutoTokenizer.from_pretrained(run / "merged")
    return _probes_for_verify(run, tok, saved_template(load_resolved(run / "resolved.yaml").data.template, tok))


def test_cli_gguf_ollama_adapter_verify_f16(exported):
    """f16 agrees with HF-on-f16-rounded-weights on >= 99% of argmaxes; tokenisation is identical."""
    from finetune.export import export_complete

    run, result = exported
    assert result.exit_code == 0, result.output
    ver = json.loads((run / "export" / "verify.json").read_text())
    assert ver["passed"] and ver["gguf_type"] == "f16"
    assert ver["vs_same_weights"]["argmax_agreement"] >= 0.99
    assert ver["tokenisation"]["identical"] == ver["tokenisation"]["texts"] >= 30
    assert ver["summary"] in result.output and ver["summary"] in (run / "report.md").read_text()
    assert (run / "export" / "gguf" / "run-f16.gguf").is_file() and (run / "export" / "gguf" / "Modelfile").is_file()
    assert export_complete(run, ["gguf", "ollama", "adapter"], "f16")
    assert not export_complete(run, ["gguf"], "q8_0") and not export_complete(run, ["hf"], "f16")


def test_gguf_f32_matches_hf_in_llama_cpp(run):
    from finetune.export import export_run

    ver = export_run(run, ["gguf"], gguf_type="f32", verify=True)["verify"]
    assert ver["vs_same_weights"]["max_abs_dlogit"] <= 1e-3
    assert ver["vs_same_weights"]["argmax_agreement"] == 1.0
    assert ver["vs_same_weights"]["positions"] >= 40
    assert ver["passed"]


def test_tokenisation_parity_unicode_emoji_and_chat_text(exported):
    from transformers import AutoTokenizer

    from finetune.export.verify import tokenizer_parity

    run, _ = exported
    tok = AutoTokenizer.from_pretrained(run / "merged")
    chat = tok.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    texts = ["héllo wörld naïve café", "東京 😀 🚀 👍🏽", "tab\tand\nnewlines\n\n  spaces", chat,
             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "</s><s><unk> specials inline"]
    assert "<|im_start|>" in chat
    path = run / "export" / "gguf" / "run-f16.gguf"
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    try:
        parity = tokenizer_parity(llm, tok, texts)
        specials = llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)
    finally:
        llm.close()
    assert parity["identical"] == parity["texts"] == 2 * len(texts), parity["mismatches"]
    assert specials[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_negative_control_unpermuted_qk_fails(run, tmp_path):
    """Without the rotary permutation the file loads and runs, and only the logit check can notice."""
    from finetune.export.gguf import write_gguf
    from finetune.export.verify import verify_gguf

    seqs, texts = _seqs_and_texts(run)
    bad = write_gguf(run / "merged", tmp_path / "bad.gguf", "f32", permute=False).path
    ver = verify_gguf(bad, run / "merged", "f32", seqs, texts)
    assert not ver["passed"]
    assert ver["vs_same_weights"]["max_abs_dlogit"] > 1e-2
    assert ver["tokenisation"]["identical"] == ver["tokenisation"]["texts"]  # the tokenizer is not the problem


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_q8_0_falls_back_to_f16_for_odd_rows_and_still_verifies(tmp_path):
    from finetune.export.gguf import tensor_type, write_gguf
    from finetune.export.verify import verify_gguf

    assert tensor_type((64, 64), "q8_0") == "q8_0"
    assert tensor_type((64, 48), "q8_0") == "f16"
    assert tensor_type((64,), "q8_0") == "f32"
    # hidden 48: every matrix that reads the hidden state has rows of 48 values, not whole 32-value blocks.
    model_dir = build_tiny_llama(tmp_path / "odd", hidden=48)
    records = _Records()
    logging.getLogger("finetune").addHandler(records)  # it does not propagate to the root logger
    try:
        res = write_gguf(model_dir, tmp_path / "odd-q8_0.gguf", "q8_0")
    finally:
        logging.getLogger("finetune").removeHandler(records)
    assert res.fallbacks and any("not a multiple of 32" in m for m in records.messages)
    assert any(f.startswith("blk.0.attn_q.weight") for f in res.fallbacks)
    assert not any(f.startswith("blk.0.ffn_down.weight") for f in res.fallbacks)  # rows of 96: q8_0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = [tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]]
    ver = verify_gguf(res.path, model_dir, "q8_0", seqs, [])
    assert ver["passed"], ver["summary"]


def test_chat_template_identical_in_merged_gguf_and_modelfile(exported):
    """One conversation, three renderers: HF on merged/, llama-cpp-python's Jinja on the GGUF metadata,
    and the Modelfile's Go TEMPLATE."""
    from gguf import GGUFReader
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    import ollama_go
    from finetune.export.ollama import read_template

    run, _ = exported
    tok = AutoTokenizer.from_pretrained(run / "merged")
    hf = tok.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    reader = GGUFReader(run / "export" / "gguf" / "run-f16.gguf")
    field = reader.fields["tokenizer.chat_template"]
    gguf_template = bytes(field.parts[field.data[0]]).decode("utf-8")
    # the training-only {% generation %} markers are in merged/ and stripped from the GGUF
    assert "{%- generation -%}" in tok.chat_template and "generation -%}" not in gguf_template
    via_gguf = Jinja2ChatFormatter(gguf_template, eos_token=tok.eos_token, bos_token=tok.bos_token)(
        messages=TWO_TURNS).prompt
    modelfile = (run / "export" / "gguf" / "Modelfile").read_text()
    assert hf == via_gguf
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM "You answer briefly."' in modelfile
    assert "ollama create" in modelfile and "FROM ./run-" in modelfile
    if ollama_go.go_binary() is None:
        pytest.skip(f"Modelfile TEMPLATE not rendered: {ollama_go.NO_GO}")
    assert ollama_go.render(read_template(modelfile), TWO_TURNS) == hf  # Go's text/template, as Ollama renders


def test_adapter_export_loads_with_plain_peft_and_matches_finetune_generate(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune.cli import app

    run, _ = exported
    out = run / "export" / "adapter"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()
    # Plain transformers + peft, as a user (or vLLM/TGI) would: the base named in adapter_config.json,
    # loaded in the NF4 the adapter was trained on.
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], quantization_config=q,
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "what is red"}]
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    plain = tok.decode(gen[0, len(ids):], skip_special_tokens=True)
    result = RUNNER.invoke(app, ["generate", str(run), "--prompt", "what is red", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert plain.strip() and result.stdout.splitlines()[0] == plain


def test_hf_export_links_the_merged_model(run):
    from transformers import AutoModelForCausalLM

    from finetune.export import export_complete, export_run

    export_run(run, ["hf"])
    hf = run / "export" / "hf"
    weights = next(hf.glob("*.safetensors"))
    assert weights.stat().st_ino == (run / "merged" / weights.name).stat().st_ino  # no second copy on disk
    AutoModelForCausalLM.from_pretrained(hf)
    assert export_complete(run, ["hf"], "f16")


def test_export_user_errors_are_one_line(run, monkeypatch):
    from finetune.cli import app

    result = RUNNER.invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 2 and "--format: unknown format 'onnx'" in result.output
    result = RUNNER.invoke(app, ["export", str(run), "--format", "gguf", "--gguf-type", "q4_k"])
    assert result.exit_code == 2 and "--gguf-type: must be one of" in result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = RUNNER.invoke(app, ["export", str(run), "--format", "hf", "--push", "me/tiny"])
    assert result.exit_code == 2 and "--push me/tiny: the hub is not reachable" in result.output
    assert "Traceback" not in result.output


def _tiny_spm_llama(out):
    """A LLaMA-2-style tokenizer (BPE with byte fallback, "▁" for spaces) on a tiny random LLaMA."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tiny import CHATML, SPECIALS, corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus(), trainer=trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS + byte_tokens,
                                                                  show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out, fast


def test_sentencepiece_style_tokenizer_exports_as_llama_vocab(tmp_path):
    from gguf import GGUFReader

    from finetune.export.gguf import write_gguf
    from finetune.export.verify import verify_gguf

    model_dir, tok = _tiny_spm_llama(tmp_path / "spm")
    res = write_gguf(model_dir, tmp_path / "spm.gguf", "f32")
    field = GGUFReader(res.path).fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    chat = tok.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    ver = verify_gguf(res.path, model_dir, "f32", [tok(chat)["input_ids"]], [chat])
    assert ver["passed"], ver["summary"]
    assert ver["tokenisation"]["identical"] == ver["tokenisation"]["texts"]  # byte fallback: emoji, CJK


def test_tokenisation_check_fails_with_the_wrong_pre_tokenizer(run, tmp_path, monkeypatch):
    """Negative control for the tokeniser check: SmolLM's pre-tokenizer splits digits one by one, GPT-2's
    (which the tiny tokenizer uses) does not, so the texts with numbers must be reported."""
    import finetune.export.gguf as gguf_mod
    from finetune.export.verify import verify_gguf

    monkeypatch.setattr(gguf_mod, "pre_tokenizer_name", lambda tokenizer_json: "smollm")
    seqs, texts = _seqs_and_texts(run)
    bad = gguf_mod.write_gguf(run / "merged", tmp_path / "wrong-pre.gguf", "f32").path
    ver = verify_gguf(bad, run / "merged", "f32", seqs, texts)
    assert not ver["passed"] and "tokenisation identical" in ver["summary"].split("FAIL")[1]
    assert any("1234567" in m["text"] for m in ver["tokenisation"]["mismatches"])
