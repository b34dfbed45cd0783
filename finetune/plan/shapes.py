"""Model shapes (LLaMA family): a built-in table of published configs, or read from a local config.json, a
GGUF file's metadata or the hub cache, never downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.plan.sizes import PlanError


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the linear layers in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.hd, self.kv_heads * self.hd, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def n_params(self) -> int:
        per_layer = sum(a * b for _, a, b in self.linears()) + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


# Published configs (config.json of each checkpoint). Keys are what `--shape` accepts; ALIASES map hub ids.
SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("llama-7b", 32000, 4096, 32, 32, 32, 11008),
    Shape("llama-13b", 32000, 5120, 40, 40, 40, 13824),
    Shape("llama-33b", 32000, 6656, 60, 52, 52, 17920),
    Shape("llama-65b", 32000, 8192, 80, 64, 64, 22016),
    Shape("llama-2-7b", 32000, 4096, 32, 32, 32, 11008),
    Shape("llama-2-13b", 32000, 5120, 40, 40, 40, 13824),
    Shape("llama-2-70b", 32000, 8192, 80, 64, 8, 28672),
    Shape("llama-3-8b", 128256, 4096, 32, 32, 8, 14336),
    Shape("llama-3-70b", 128256, 8192, 80, 64, 8, 28672),
    Shape("tinyllama-1.1b", 32000, 2048, 22, 32, 4, 5632),
    Shape("smollm2-135m", 49152, 576, 30, 9, 3, 1536, tied=True),
]}
ALIASES = {
    "llama-30b": "llama-33b", "huggyllama/llama-7b": "llama-7b", "huggyllama/llama-13b": "llama-13b",
    "huggyllama/llama-30b": "llama-33b", "huggyllama/llama-65b": "llama-65b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b", "meta-llama/llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b", "meta-llama/llama-2-70b-chat-hf": "llama-2-70b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b-instruct": "llama-3-8b",
    "meta-llama/llama-3.1-8b": "llama-3-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/meta-llama-3-70b": "llama-3-70b", "meta-llama/meta-llama-3-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.1-70b": "llama-3-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "meta-llama/llama-3.3-70b-instruct": "llama-3-70b",
    "tinyllama/tinyllama-1.1b-chat-v1.0": "tinyllama-1.1b", "tinyllama/tinyllama_v1.1": "tinyllama-1.1b",
    "huggingfacetb/smollm2-135m": "smollm2-135m", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "builtin:smollm2-135m-instruct": "smollm2-135m",
}


def shape_from_config(cfg: dict, name: str) -> Shape:
    """A Shape from a config.json dict (LLaMA-family keys)."""
    try:
        heads = cfg["num_attention_heads"]
        return Shape(name, cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                     cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"],
                     bool(cfg.get("tie_word_embeddings", False)), cfg.get("head_dim"))
    except KeyError as e:
        raise PlanError(f"{name}: config has no {e.args[0]!r}; only LLaMA-family configs can be planned "
                        f"(or pass --shape, one of {', '.join(SHAPES)})") from None


def _shape_from_gguf(path: Path) -> Shape:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field_value(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        if key == "tokenizer.ggml.tokens":
            return len(f.data)
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    get = lambda k: field_value(f"{arch}.{k}")  # noqa: E731
    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    return Shape(path.stem, field_value("tokenizer.ggml.tokens") or get("vocab_size"), get("embedding_length"),
                 get("block_count"), heads, get("attention.head_count_kv") or heads, get("feed_forward_length"),
                 tied="output.weight" not in names)


def resolve_shape(base: str, shape: str | None = None) -> tuple[Shape, str]:
    """The model shape and where it came from, without downloading anything."""
    if shape:
        key = ALIASES.get(shape.lower(), shape.lower())
        if key not in SHAPES:
            raise PlanError(f"--shape: unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        return SHAPES[key], "built-in table"
    key = ALIASES.get(base.lower(), base.lower())
    if key in SHAPES:
        return SHAPES[key], "built-in table"
    path = Path(base).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), base), f"{path / 'config.json'}"
    if base.endswith(".gguf") and path.is_file():
        return _shape_from_gguf(path), f"GGUF metadata of {path.name}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json")
    except Exception:  # not a valid repo id, or no hub library: fall through to the error below
        cached = None
    if isinstance(cached, str):
        return shape_from_config(json.loads(Path(cached).read_text()), base), "cached hub config"
    raise PlanError(f"model.base: no local config for {base!r} and it is not in the built-in table; "
                    f"pass --shape with one of {', '.join(SHAPES)}")
