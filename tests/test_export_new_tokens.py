"""Export of a run with new tokens (issue 18): `finetune export RUN --format gguf adapter --gguf-type f16 --verify`
on a tiny NF4 run whose template markers <|user|>/<|assistant|>/<|end|> were added (data.add_template_tokens).
The GGUF carries the new tokens (text, id, CONTROL type as llama.cpp expects for added special tokens), its
end-of-turn id is <|end|>, llama.cpp tokenises the markers as single tokens and --verify passes; the exported
PEFT adapter loads in plain transformers + PeftModel and gives the merged model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from test_lora_options import END, _template

NEW = ("<|user|>", "<|assistant|>", END)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    from conftest import make_recipe
    from merged_run import one_thread

    from finetune.cli import app
    from finetune.merge import merge_run
    from finetune.recipe import load_recipe
    from finetune.train import train

    tmp = tmp_path_factory.mktemp("newtok-export")
    with one_thread():
        path = make_recipe(tmp, tiny_model_dir, data={"template": _template(tmp), "add_template_tokens": True,
                                                      "held_out": 4},
                           train={"max_steps": 6, "learning_rate": 3e-2})
        run = train(load_recipe(path), path)
        merge_run(run)
        result = CliRunner().invoke(app, ["export", str(run), "--format", "gguf", "adapter", "--gguf-type", "f16",
                                          "--verify"])
    return run, result


def test_gguf_carries_the_new_tokens_and_verify_passes(exported, tiny_model_dir):
    import gguf
    from transformers import AutoTokenizer

    run, result = exported
    assert result.exit_code == 0, result.output
    ver = json.loads((run / "export" / "verify.json").read_text())
    assert ver["passed"], ver.get("summary")
    tok = AutoTokenizer.from_pretrained(run / "merged")
    ids = [tok.convert_tokens_to_ids(t) for t in NEW]
    assert min(ids) >= len(AutoTokenizer.from_pretrained(tiny_model_dir))
    path = next((run / "export" / "gguf").glob("*-f16.gguf"))
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"]
    types = r.fields["tokenizer.ggml.token_type"]
    for t, i in zip(NEW, ids):
        assert bytes(tokens.parts[tokens.data[i]]).decode() == t
        assert int(types.parts[types.data[i]][0]) == gguf.TokenType.CONTROL, t
    eot = r.fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[eot.data[0]][0]) == tok.convert_tokens_to_ids(END)
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert len(tok) in list(emb.shape)
    # llama.cpp itself: each marker is one token with the HF id
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for t, i in zip(NEW, ids):
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == [i], t
    finally:
        llm.close()


def test_exported_adapter_loads_in_plain_peft_with_merged_logits(exported, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run, result = exported
    assert result.exit_code == 0, result.output
    adapter = run / "export" / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in NEW)
    ids = tok.apply_chat_template([{"role": "user", "content": "what is red"}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, dtype=torch.float32)
    base = base.dequantize(dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(base, adapter).eval()(input_ids=x).logits[0]
        got = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)(input_ids=x).logits[0]
    assert (ref - got).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
