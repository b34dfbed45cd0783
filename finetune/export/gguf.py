"""Write a merged LLaMA checkpoint as GGUF in pure Python (the `gguf` package), so no llama.cpp compile is needed.

What llama.cpp expects and HF does not give for free:
- q_proj/k_proj rows permuted back to llama.cpp's rotary layout (HF's checkpoints interleave them differently);
- 1-D tensors (norms) always f32; Q8_0 only for rows that are a multiple of its 32-value block;
- the tokenizer as a token list with types, BPE merges and a pre-tokenizer name llama.cpp knows;
- the run's chat template, with the training-only `{% generation %}` markers removed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import UserError

log = logging.getLogger("finetune")

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32


class GGUFExportError(UserError):
    """The merged model cannot be written as GGUF; the message says why."""


def strip_generation_markers(template: str) -> str:
    """Remove `{% generation %}`/`{% endgeneration %}`: they only mark assistant tokens for the training loss,
    render to nothing, and runtimes other than transformers reject the unknown tag."""
    return re.sub(r"\{%-?\s*(?:end)?generation\s*-?%\}", "", template)


# ---------------------------------------------------------------------------------------------
# Tensors


def tensor_type(shape: tuple[int, ...], gguf_type: str) -> str:
    """The type a tensor is stored in: 1-D tensors stay f32; Q8_0 rows must be whole 32-value blocks."""
    if len(shape) < 2 or gguf_type == "f32":
        return "f32"
    if gguf_type == "q8_0" and shape[-1] % Q8_BLOCK:
        return "f16"
    return gguf_type


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's (the inverse of the permute in HF's convert_llama_weights_to_hf)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def encode_tensor(data: np.ndarray, ttype: str):
    """(bytes-array, raw dtype or None) as GGUFWriter.add_tensor wants them."""
    import gguf

    if ttype == "f32":
        return data.astype(np.float32), None
    if ttype == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[ttype]
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def round_trip(data: np.ndarray, ttype: str) -> np.ndarray:
    """What llama.cpp will read back for `data` stored as `ttype` (used to build the HF reference in verify)."""
    import gguf

    if ttype == "f32":
        return data.astype(np.float32)
    if ttype == "f16":
        return data.astype(np.float16).astype(np.float32)
    arr, qtype = encode_tensor(data, ttype)
    return gguf.quants.dequantize(arr, qtype).reshape(data.shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer whose splitting equals this byte-level BPE tokenizer's.

    llama.cpp identifies pre-tokenizers by name, not by regex. A lone ByteLevel(use_regex) is GPT-2's regex;
    GPT-2's regex after splitting digits one by one is SmolLM's.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    log.warning("gguf: pre-tokenizer %s has no known llama.cpp name; using gpt-2. Check the tokenisation with "
                "`finetune export --verify`", kinds)
    return "gpt-2"


@dataclass
class Vocab:
    model: str
    """tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style BPE with byte fallback)."""
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    notes: list[str] = field(default_factory=list)


def build_vocab(model_dir: Path, tok, n_vocab: int) -> Vocab:
    """Token list and types in llama.cpp's conventions, padded to the embedding's row count."""
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    mtype = tj.get("model", {}).get("type")
    if mtype != "BPE":
        raise GGUFExportError(f"{model_dir / 'tokenizer.json'}: tokenizer model {mtype} is not supported for GGUF "
                              "(byte-level BPE and SentencePiece-style BPE are)")
    spm = bool(tj["model"].get("byte_fallback"))
    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types, scores = [], [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1000.0)
            continue
        text = reverse[i]
        if i in added:
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
            if not added[i].special and spm:
                text = text.replace("\u2581", " ")
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
        tokens.append(text)
        # SentencePiece-style merging prefers higher scores; HF orders such vocabularies by merge rank.
        scores.append(-float(i))
    notes = []
    if len(reverse) < n_vocab:
        notes.append(f"padded the vocabulary from {len(reverse)} to {n_vocab} entries (the embedding's rows)")
    if spm:
        return Vocab("llama", None, tokens, types, scores, notes)
    return Vocab("gpt2", pre_tokenizer_name(tj), tokens, types, None, notes)


def _adds_token(tok, which: str) -> bool:
    """Whether HF's tokenizer adds BOS/EOS when encoding plain text (llama.cpp must do the same)."""
    tid = getattr(tok, f"{which}_token_id")
    ids = tok("a")["input_ids"]
    return tid is not None and bool(ids) and (ids[0] == tid if which == "bos" else ids[-1] == tid)


# ---------------------------------------------------------------------------------------------
# The file


@dataclass
class GGUFResult:
    path: Path
    gguf_type: str
    tensors: int
    fallbacks: list[str]
    notes: list[str]


def _config_values(config) -> dict:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {"n_head": n_head, "n_kv": getattr(config, "num_key_value_heads", None) or n_head,
            "head_dim": head_dim, "rope": rope, "theta": float(theta)}


def _rope_scaling(writer, rope: dict, head_dim: int):
    """Rope scaling metadata; llama3-style scaling becomes the rope_freqs tensor, as llama.cpp's converter does."""
    import math

    import gguf

    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return None
    if kind == "llama3":
        base = float(rope.get("rope_theta", 10000.0))
        factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        low_wl, high_wl = old_ctx / low, old_ctx / high
        freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factors = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < high_wl:
                factors.append(1.0)
            elif wl > low_wl:
                factors.append(factor)
            else:
                smooth = (old_ctx / wl - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return np.array(factors, dtype=np.float32)
    raise GGUFExportError(f"config.json: rope scaling {kind!r} is not supported by the GGUF writer "
                          "(default, linear and llama3 are)")


def write_gguf(model_dir: Path, out: Path, gguf_type: str = "f16", chat_template: str | None = None,
               end_token: str | None = None, name: str = "finetune", permute: bool = True) -> GGUFResult:
    """Convert the HF LLaMA checkpoint in `model_dir` to one GGUF file at `out` (published atomically).

    `permute=False` leaves q/k in HF's layout: wrong on purpose, for the negative-control test of --verify.
    """
    import gguf

    from finetune.rundir import publishing_file

    model_dir = Path(model_dir)
    config, tok, files = _open_checkpoint(model_dir, gguf_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    with publishing_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(name)
        rope_freqs = _write_hparams(writer, config, gguf_type)
        vocab = _write_tokenizer(writer, model_dir, tok, config.vocab_size, chat_template, end_token)
        count, fallbacks = _write_tensors(writer, files, config, gguf_type, permute)
        if rope_freqs is not None:
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS], rope_freqs)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    for n in vocab.notes:
        log.info("gguf: %s", n)
    return GGUFResult(out, gguf_type, count, fallbacks, vocab.notes)


def _open_checkpoint(model_dir: Path, gguf_type: str):
    """(config, tokenizer, safetensors files), after checking that the GGUF writer can take this checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type: must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise GGUFExportError(f"{model_dir / 'config.json'}: model_type {config.model_type!r}; the GGUF writer "
                              "supports the LLaMA architecture (model_type llama)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir}: no .safetensors files; run `finetune merge` first")
    return config, tok, files


def _write_hparams(writer, config, gguf_type: str):
    """The architecture's numbers and the file type; returns the rope_freqs tensor when rope scaling needs one."""
    import gguf

    cv = _config_values(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(cv["n_head"])
    writer.add_head_count_kv(cv["n_kv"])
    writer.add_rope_dimension_count(cv["head_dim"])
    writer.add_rope_freq_base(cv["theta"])
    if cv["head_dim"] != config.hidden_size // cv["n_head"]:
        writer.add_key_length(cv["head_dim"])
        writer.add_value_length(cv["head_dim"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return _rope_scaling(writer, cv["rope"], cv["head_dim"])


def _write_tokenizer(writer, model_dir: Path, tok, n_vocab: int, chat_template: str | None,
                     end_token: str | None) -> Vocab:
    """Vocabulary, merges, special tokens (BOS/EOS added as HF adds them, EOT = the template's end token) and
    the chat template without its training-only markers."""
    import gguf

    vocab = build_vocab(model_dir, tok, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    special.add_special_token["bos"] = _adds_token(tok, "bos")
    special.add_special_token["eos"] = _adds_token(tok, "eos")
    if chat_template is not None:
        special.chat_template = strip_generation_markers(chat_template)
    elif isinstance(special.chat_template, str):
        special.chat_template = strip_generation_markers(special.chat_template)
    special.add_to_gguf(writer, quiet=True)
    if end_token and end_token != tok.eos_token:
        # llama.cpp stops generation at EOT as well as EOS: the template's end-of-turn token goes there.
        writer.add_eot_token_id(tok.convert_tokens_to_ids(end_token))
    return vocab


def _write_tensors(writer, files: list[Path], config, gguf_type: str, permute: bool) -> tuple[int, list[str]]:
    """Every tensor, one at a time from the (memory-mapped) safetensors shards; (count, f16 fallbacks)."""
    import gguf
    from safetensors import safe_open

    cv = _config_values(config)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    fallbacks, count = [], 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise GGUFExportError(f"{f.name}: tensor {key} has no GGUF name for LLaMA")
                data = st.get_tensor(key).float().numpy()
                if permute and key.endswith(("q_proj.weight", "k_proj.weight")):
                    data = permute_qk(data, cv["n_head"] if key.endswith("q_proj.weight") else cv["n_kv"])
                ttype = tensor_type(data.shape, gguf_type)
                if ttype != tensor_type(data.shape, "f32") and ttype != gguf_type:
                    fallbacks.append(f"{new} {list(data.shape)}: row length {data.shape[-1]} is not a multiple of "
                                     f"{Q8_BLOCK}; stored as {ttype}")
                    log.warning("gguf: %s", fallbacks[-1])
                arr, raw = encode_tensor(data, ttype)
                writer.add_tensor(new, arr, raw_dtype=raw)
                count += 1
    return count, fallbacks
