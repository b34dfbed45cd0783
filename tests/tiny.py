"""A tiny random LLaMA and a byte-level BPE tokenizer trained on the spot: no network, ~1 s to build."""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CHATML = (Path(__file__).resolve().parent.parent / "data_templates" / "chatml.jinja").read_text()

WORDS = ("the quick brown fox jumps over a lazy dog what is capital of france paris answer question "
         "please write json name age city extract instruction input response user assistant system "
         "hello world one two three four five six seven eight nine ten yes no red green blue").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
    lines += ["### Instruction:\n### Response:\nBelow is an instruction that describes a task.",
              "[INST] <<SYS>>\n<</SYS>>\n\n [/INST] USER: ASSISTANT: <|user|>\n<|assistant|>\n<|system|>\n",
              '{"name": "Ann", "age": 31, "city": "Oslo"} 0123456789 ,.;:!?-_()[]{}<>/\\"\'',
              "héllo wörld naïve café 東京 😀 🚀 emoji ünïcödé"]
    return lines


def build_tokenizer(out: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0):
    """Save a tiny random LlamaForCausalLM + tokenizer to `out` (fp32 safetensors)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def color_rows(n: int = 32) -> list[dict]:
    """A learnable toy task: map a colour to a fixed answer; every row's text is distinct."""
    pairs = [("red", "one"), ("green", "two"), ("blue", "three"), ("yes", "four")]
    fillers = WORDS[:20]
    return [{"instruction": f"what is {pairs[i % 4][0]} {fillers[i // 4 % 20]} {i // 80}", "input": "",
             "output": pairs[i % 4][1]} for i in range(n)]
