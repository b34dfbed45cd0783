"""Every template: exact rendering, assistant-only labels with the end token supervised, and train/inference parity."""

from __future__ import annotations

import pytest

from finetune.data import Example, check_template_tokens, encode, prompt_ids, render_ids_and_mask
from finetune.templates import available_templates, check_tokenizer_supports, load_template

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "red one"}, {"role": "user", "content": "and blue?"},
        {"role": "assistant", "content": "three"}]

# The exact text each template renders for CONV with the tiny tokenizer (bos <s>, eos </s>), and the
# supervised spans: each assistant reply followed by that template's end-of-turn token.
GOLDEN = {
    "alpaca": ("<s>Be brief.\n\n### Instruction:\nhello\n\n### Response:\nred one</s>\n\n### Instruction:\nand blue?"
               "\n\n### Response:\nthree</s>\n\n", ["red one</s>", "three</s>"]),
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
               "red one<|im_end|>\n<|im_start|>user\nand blue?<|im_end|>\n<|im_start|>assistant\nthree<|im_end|>\n",
               ["red one<|im_end|>", "three<|im_end|>"]),
    "llama2_chat": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhello [/INST] red one </s><s>[INST] and blue? [/INST]"
                    " three </s>", [" red one </s>", " three </s>"]),
    "llama3_chat": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nred one"
                    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nand blue?<|eot_id|><|start_header_id|>"
                    "assistant<|end_header_id|>\n\nthree<|eot_id|>", ["red one<|eot_id|>", "three<|eot_id|>"]),
    "mistral": ("<s>[INST] Be brief.\n\nhello [/INST]red one</s>[INST] and blue? [/INST]three</s>",
                ["red one</s>", "three</s>"]),
    "plain": ("<s>Be brief.hellored one</s>and blue?three</s>", ["red one</s>", "three</s>"]),
    "vicuna": ("<s>Be brief. USER: hello ASSISTANT: red one</s>USER: and blue? ASSISTANT: three</s>",
               [" red one</s>", " three</s>"]),
    "phi3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nhello<|end|>\n<|assistant|>\nred one<|end|>\n<|user|>\nand blue?"
             "<|end|>\n<|assistant|>\nthree<|end|>\n", ["red one<|end|>", "three<|end|>"]),
    "zephyr": ("<|system|>\nBe brief.</s>\n<|user|>\nhello</s>\n<|assistant|>\nred one</s>\n<|user|>\nand blue?</s>\n"
               "<|assistant|>\nthree</s>\n", ["red one</s>", "three</s>"]),
}
REQUIRED = ["alpaca", "vicuna", "llama2_chat", "llama3_chat", "chatml", "mistral", "zephyr", "plain"]


def test_library_is_complete():
    assert set(REQUIRED) <= set(available_templates())
    assert set(GOLDEN) == set(available_templates()), "every shipped template needs a golden test"


def _tokenizer_for(t, tiny_tokenizer):
    """The tiny tokenizer, plus the template's special tokens it lacks added as `data.add_template_tokens` adds them
    (phi3's turn markers are not in it): a copy, so the session's tokenizer stays as built."""
    import copy

    from finetune.models import add_new_tokens

    missing = check_tokenizer_supports(t, tiny_tokenizer)
    if not missing:
        return tiny_tokenizer
    tok = copy.deepcopy(tiny_tokenizer)
    add_new_tokens(tok, missing)
    return tok


def _spans(ids, mask):
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_ids_and_labels(name, tiny_tokenizer):
    t = load_template(name)
    tok = _tokenizer_for(t, tiny_tokenizer)
    text, replies = GOLDEN[name]
    ids, mask = render_ids_and_mask(CONV, tok, t)
    assert tok.decode(ids) == text
    assert [tok.decode(s) for s in _spans(ids, mask)] == replies
    enc = encode(Example("x", CONV), tok, t, max_length=512)
    assert enc.labels == [i if m else -100 for i, m in zip(ids, mask)]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_end_token_supervised_no_double_bos(name, tiny_tokenizer):
    t = load_template(name)
    tok = _tokenizer_for(t, tiny_tokenizer)
    assert check_template_tokens(tok, t) == []
    enc = encode(Example("x", CONV), tok, t, max_length=512)
    end_id = tok.convert_tokens_to_ids(t.end_token(tok))
    supervised = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert supervised.count(end_id) == 2, "each assistant turn's end token is supervised"
    assert enc.input_ids[:2].count(tok.bos_token_id) <= 1


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_prompt_parity_with_inference(name, tiny_tokenizer):
    """The ids before each reply in training equal apply_chat_template(..., add_generation_prompt=True)."""
    t = load_template(name)
    tok = _tokenizer_for(t, tiny_tokenizer)
    ids, mask = render_ids_and_mask(CONV, tok, t)
    hf = tok.apply_chat_template(CONV[:2], chat_template=t.source, add_generation_prompt=True, tokenize=True,
                                 return_dict=True)["input_ids"]
    assert ids[: len(hf)] == list(hf), "first reply: identical to transformers' own generation prompt"
    for turn in (2, 4):
        prompt = prompt_ids(CONV[:turn], tok, t)
        assert ids[: len(prompt)] == prompt, f"turn {turn}"
        assert mask[len(prompt)] == 1 and not any(mask[: len(prompt)][-1:] if turn == 2 else [0])


# Phi-3.5-mini-instruct's own chat template (its tokenizer_config.json), the reference for data_templates/phi3.jinja.
PHI35 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
         "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
         "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
         "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")


SPACED = [{"role": "user", "content": " two\nlines "}, {"role": "assistant", "content": "x "}]


@pytest.mark.parametrize("conv", [CONV, CONV[1:], [{"role": "system", "content": ""}, *CONV[1:]], SPACED],
                         ids=["system", "no-system", "empty-system", "whitespace"])
def test_phi3_renders_as_phi35_own_template(conv, tiny_tokenizer):
    """Every prompt is the text Phi-3.5's own template renders; a finished conversation differs only by the eos_token
    that template appends after it (outside any turn, never supervised)."""
    ours = load_template("phi3").source

    def render(source, messages, gen):
        return tiny_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                  add_generation_prompt=gen)

    for k, m in enumerate(conv):
        if m["role"] == "user":
            assert render(ours, conv[: k + 1], True) == render(PHI35, conv[: k + 1], True)
    assert render(ours, conv, False) + tiny_tokenizer.eos_token == render(PHI35, conv, False)


def test_train_on_prompt_supervises_everything(tiny_tokenizer):
    enc = encode(Example("x", CONV), tiny_tokenizer, load_template("chatml"), 512, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_tokenizer_template_uses_prefix_masks(tiny_tokenizer):
    """`template: tokenizer` (the model's own template, no generation markers) still masks correctly."""
    tok = tiny_tokenizer
    own = load_template("chatml")
    from finetune.templates import ChatTemplate

    stripped = ChatTemplate("tokenizer", own.source.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""),
                            end_of_turn="<|im_end|>")
    assert not stripped.has_generation_markers
    assert render_ids_and_mask(CONV, tok, stripped) == render_ids_and_mask(CONV, tok, own)


def test_template_needing_missing_special_tokens_is_caught(tmp_path):
    import sys
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import corpus

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    assert check_tokenizer_supports(load_template("chatml"), tok) == ["<|im_start|>", "<|im_end|>"]
    assert check_tokenizer_supports(load_template("llama3_chat"), tok) == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert check_tokenizer_supports(load_template("alpaca"), tok) == []


def test_user_template_file(tmp_path, tiny_tokenizer):
    own = tmp_path / "mine.jinja"
    own.write_text(load_template("alpaca").source.replace("### Instruction:", "### Question:"))
    t = load_template(str(own))
    assert t.end_of_turn == "eos_token" and t.name == "mine"
    ids, mask = render_ids_and_mask(CONV, tiny_tokenizer, t)
    assert "### Question:\nhello" in tiny_tokenizer.decode(ids) and sum(mask) > 0


def test_templates_readme_documents_each_template():
    from finetune.templates import templates_dir

    readme = (templates_dir() / "README.md").read_text()
    # The table: | `name` | for models | special tokens it needs | end of turn (supervised) |
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == available_templates(), "one table row per bundled template, and no other"
    for name, (_, _, needs, end) in rows.items():
        t = load_template(name)
        if t.end_of_turn == "eos_token":
            assert end.startswith("EOS"), f"{name}: the end of turn is EOS, the README says {end!r}"
        else:
            assert end == f"`{t.end_of_turn}`", f"{name}: the end of turn is {t.end_of_turn}, the README says {end!r}"
        for token in t.requires:
            assert f"`{token}`" in needs, f"{name}: needs {token}, not in the README's {needs!r}"
    alternating = [line for line in readme.splitlines() if "cannot express two turns of the same role" in line]
    assert len(alternating) == 1
    named = sorted(n for n in available_templates() if f"`{n}`" in alternating[0])
    assert named == sorted(n for n in available_templates() if load_template(n).alternating)
