"""The new-token demonstration of issue 18 on the real SmolLM2-135M-Instruct (minutes on a CPU): `pytest -m slow`.

recipes/smollm2/135m_new_tokens.yaml trains the quickstart's extraction task in Phi-3's format, whose turn markers
<|system|> <|user|> <|assistant|> <|end|> SmolLM2 lacks; data.add_template_tokens adds them and only their rows of
the (tied) embedding train, plus LoRA. `finetune run` trains, merges, evaluates and exports the f16 GGUF with
--verify. Checked: held-out replies end with the new <|end|> (not SmolLM2's own EOS <|im_end|>, which also stops a
reply) and beat the base; the merged embedding differs from the base's only in the new rows; llama.cpp, on the
exported GGUF, treats <|end|> as end of generation and stops on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/smollm2/135m_new_tokens.yaml"
END, MARKERS = "<|end|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Only the held-out task: the general tasks show forgetting, not the new tokens (and would double the eval time).
EXTRACTION = "[{name: extraction, kind: held_out, metrics: [json_match, exact_match], max_new_tokens: 32}]"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("newtok") / "nt"
    proc = subprocess.run([sys.executable, "-m", "finetune", "run", RECIPE, f"output_dir={out}",
                           "train.report_to=[none]", f"eval.tasks={EXTRACTION}"],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def _result(run: Path, metric: str, model: str) -> float:
    rows = json.loads((run / "eval" / "results.json").read_text())["results"]
    return next(r["value"] for r in rows if (r["task"], r["metric"], r["model"]) == ("extraction", metric, model))


@pytest.mark.slow
def test_held_out_replies_end_with_the_new_token_and_beat_the_base(run):
    assert _result(run, "stop_rate", "adapter") >= 0.95
    assert _result(run, "end_token_rate", "adapter") >= 0.95, "replies stop on SmolLM2's EOS, not on <|end|>"
    preds = [json.loads(line) for line in (run / "eval" / "predictions" / "extraction.jsonl").open()]
    assert sum(p["details"]["adapter"]["stop_token"] == END for p in preds) >= 0.95 * len(preds)
    assert _result(run, "json_match", "adapter") >= 0.9 > _result(run, "json_match", "base")
    assert _result(run, "exact_match", "adapter") > _result(run, "exact_match", "base")


@pytest.mark.slow
def test_only_the_new_rows_of_the_embedding_changed(run):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import resize_for_tokenizer

    tok = AutoTokenizer.from_pretrained(run / "merged")
    ids = [tok.convert_tokens_to_ids(t) for t in MARKERS]
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["trainable_token_indices"]["embed_tokens"]) == sorted(ids)
    base = AutoModelForCausalLM.from_pretrained(json.loads((run / "manifest.json").read_text())["base"]["hf_path"],
                                                dtype=torch.float32)
    n_base = base.get_input_embeddings().weight.shape[0]
    assert sorted(ids) == list(range(n_base, n_base + len(MARKERS)))
    resize_for_tokenizer(base, tok)  # the rows training started from (seeded, as train/merge/eval build them)
    start = base.get_input_embeddings().weight.detach()
    with safe_open(run / "merged" / "model.safetensors", framework="pt") as f:
        merged = f.get_tensor("model.embed_tokens.weight").float()
        assert "lm_head.weight" not in f.keys()  # still tied: the output rows are the same rows
    assert merged.shape == start.shape
    assert torch.equal(merged[:n_base], start[:n_base]), "a row of the base vocabulary changed"
    # Every new row trained (<|system|> too, though no row uses it: as an output row the softmax pushes it down).
    moved = {t: float((merged[i] - start[i]).norm()) for t, i in zip(MARKERS, ids)}
    assert min(moved.values()) > 0.05, moved


def _llama_cpp_replies(gguf_path: Path, prompts: list[str], max_new: int) -> tuple[list[tuple[int, int]], bool]:
    """Greedy replies in llama.cpp: (last token, tokens generated) per prompt, stopping at end of generation as
    llama.cpp decides it (llama_vocab_is_eog); and whether <|end|> itself is end of generation there."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        end_id = llm.tokenize(END.encode(), add_bos=False, special=True)
        out = []
        for text in prompts:
            llm.reset()
            n, last = 0, None
            for last in llm.generate(llm.tokenize(text.encode(), add_bos=False, special=True), top_k=1, temp=0.0):
                n += 1
                if llama_cpp.llama_vocab_is_eog(vocab, last) or n >= max_new:
                    break
            out.append((last, n))
        return out, len(end_id) == 1 and bool(llama_cpp.llama_vocab_is_eog(vocab, end_id[0]))
    finally:
        llm.close()


@pytest.mark.slow
def test_the_exported_gguf_stops_on_the_new_end_token_in_llama_cpp(run):
    from transformers import AutoTokenizer

    ver = json.loads((run / "export" / "verify.json").read_text())
    assert ver["passed"], ver.get("summary")
    tok = AutoTokenizer.from_pretrained(run / "merged")
    rows = [json.loads(line) for line in (run / "held_out.jsonl").open()]
    prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows]
    assert prompts[0].endswith("<|end|>\n<|assistant|>\n")
    replies, end_is_eog = _llama_cpp_replies(next((run / "export" / "gguf").glob("*-f16.gguf")), prompts, 32)
    assert end_is_eog, "llama.cpp does not treat <|end|> as end of generation"
    end_id = tok.convert_tokens_to_ids(END)
    assert sum(last == end_id for last, _ in replies) >= 0.95 * len(rows), replies
