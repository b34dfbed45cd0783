"""Every private or undocumented part of another library that finetune relies on, in one table.

A private Trainer method, an attribute that bitsandbytes sets in its constructor, a profiler object nobody
documents: any release may rename or drop them, and then finetune breaks far from the cause. Each use is one
`Internal` record below; tests/test_internals.py resolves every record, so an upgrade that drops one fails
there with a message naming the internal, the installed version and the versions we test. pyproject.toml caps
these packages at the next minor version we have not tested (`TESTED` must agree with it; a test checks).

Nothing is imported here at import time: `check` and `get` import the library when they are called.

Code that imports an internal by name can go through `get(path)`, which raises the same clear message instead
of a bare ImportError. Code that sets or reads an attribute on an object it already holds just uses it: the
record and its test are the guard.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, replace
from importlib import metadata

from finetune.errors import UserError

TESTED = {
    "transformers": "5.24",
    "peft": "0.21",
    "trl": "1.16",
    "bitsandbytes": "0.50",
    "accelerate": "1.15",
    "torch": "2.13",
    "numpy": "2.4",
}
"""The newest minor version of each package that finetune's tests have passed with. pyproject.toml allows up to
(not including) the next minor for the first five; torch is pinned by the README's setup command and numpy is
only reached through a fallback (see their records)."""


class InternalMissing(UserError):
    """A library no longer has an internal finetune uses (the message names the versions to install)."""


@dataclass(frozen=True)
class Internal:
    package: str
    """The distribution whose internal it is (its version goes in the error message)."""
    path: str
    """Dotted path: a module, then attributes (`pkg.mod.Class.attr`). For a class, the attribute must exist on
    the class; for an attribute that only instances have, `instance` names how check() builds one."""
    use: str
    """What finetune uses it for."""
    used_in: tuple[str, ...]
    """The modules that use it."""
    params: tuple[str, ...] | None = None
    """For a callable we call or override: the parameter names it must accept (self excluded)."""
    instance: str | None = None
    """For an attribute set on instances at run time: the name of a builder in this module (`_build_*`) that
    makes a small instance of the owner, or of what the owner returns when it is a function (the last dotted
    component is then looked up on that instance)."""
    source_sha: str | None = None
    """For code we copied or skip: the first 12 hex digits of the sha256 of its source when finetune was written
    against it. A change means: re-read it, port what matters, then update this value."""


I = Internal  # keeps the table below readable

RECORDS: tuple[Internal, ...] = (
    # --- transformers: the Trainer's checkpoint writing (guard.GuardedSFTTrainer replaces _save_checkpoint)
    I("transformers", "transformers.Trainer._save_checkpoint",
      "replaced by GuardedSFTTrainer (atomic checkpoints), whose body follows this one step by step: when its code "
      "changes, re-read it and port the change to guard.py", ("finetune/guard.py",), params=("model", "trial"),
      source_sha="a9111e30faa9"),
    I("transformers", "transformers.Trainer._save_optimizer_and_scheduler",
      "called from our _save_checkpoint: the optimizer and LR scheduler state the Trainer resumes from",
      ("finetune/guard.py",), params=("output_dir",)),
    I("transformers", "transformers.Trainer._save_scaler",
      "called from our _save_checkpoint: the GradScaler state (fp16)", ("finetune/guard.py",), params=("output_dir",)),
    I("transformers", "transformers.Trainer._save_rng_state",
      "called from our _save_checkpoint: the RNG states the Trainer's _load_rng_state restores on resume",
      ("finetune/guard.py",), params=("output_dir",)),
    I("transformers", "transformers.Trainer.save_model",
      "called with the private keyword _internal_call=True, as the Trainer's own _save_checkpoint does",
      ("finetune/guard.py",), params=("output_dir", "_internal_call")),
    I("transformers", "transformers.Trainer.store_flos",
      "undocumented; called from our _save_checkpoint so the saved state carries total_flos",
      ("finetune/guard.py",), params=()),
    I("transformers", "transformers.Trainer.training_step",
      "overridden by GuardedSFTTrainer (NaN guard) with the Trainer's signature",
      ("finetune/guard.py",), params=("model", "inputs", "num_items_in_batch")),
    I("transformers", "transformers.trainer.TRAINER_STATE_NAME",
      "file name of trainer_state.json inside a checkpoint", ("finetune/guard.py",)),
    I("transformers", "transformers.trainer_callback.ExportableState",
      "callbacks whose state goes into trainer_state.json (stateful_callbacks)", ("finetune/guard.py",)),
    I("transformers", "transformers.TrainerState.stateful_callbacks",
      "filled by our _save_checkpoint as the Trainer's does", ("finetune/guard.py",)),
    # --- transformers: models, quantizers, tokenizers, chat templates
    I("transformers", "transformers.integrations.sdpa_attention.sdpa_attention_forward",
      "called once per example of a packed row by attention.packed_sdpa (and for everything it does not split)",
      ("finetune/attention.py",), params=("module", "query", "key", "value", "attention_mask", "dropout", "scaling",
                                          "is_causal")),
    I("transformers", "transformers.masking_utils.sdpa_mask",
      "registered as the mask builder of attention.NAME, so an unsplit batch gets sdpa's own mask",
      ("finetune/attention.py",)),
    I("transformers", "transformers.masking_utils.AttentionMaskInterface.register",
      "registers attention.NAME's mask builder (AttentionInterface.register is the documented half)",
      ("finetune/attention.py",)),
    I("transformers", "transformers.PreTrainedModel.hf_quantizer",
      "from_pretrained leaves the quantizer here: models sets it to None (with is_quantized=False) to detach the "
      "GGUF quantizer so save_pretrained works; models._forget_quantization reads it to detach bnb's",
      ("finetune/models.py",), instance="_build_4bit_tiny_llama"),
    I("transformers", "transformers.PreTrainedModel.is_loaded_in_4bit",
      "set by the bnb quantizer; cleared after dequantising so the model saves as dense (models._forget_quantization)",
      ("finetune/models.py",), instance="_build_4bit_tiny_llama"),
    I("transformers", "transformers.quantizers.base.HfQuantizer.remove_quantization_config",
      "detaches bnb quantisation from a dequantised model (models._forget_quantization)",
      ("finetune/models.py",), params=("model",)),
    I("transformers", "transformers.utils.chat_template_utils.render_jinja_template",
      "renders a template with {% generation %} masks without a tokenizer round trip", ("finetune/data/encode.py",),
      params=("conversations", "chat_template", "return_assistant_tokens_mask", "add_generation_prompt")),
    I("transformers", "transformers.PreTrainedTokenizerFast._tokenizer",
      "fallback to the tokenizers backend when backend_tokenizer is missing (data.cache.tokenizer_fingerprint)",
      ("finetune/data/cache.py",), instance="_build_fast_tokenizer"),
    # --- peft/bitsandbytes: new-token rows and 8-bit merge (issue 18)
    I("peft", "peft.utils.other.TrainableTokensWrapper._getattr_wrapped",
      "answers lm_head.weight with the merged weight (base + trainable new rows), which TRL's fused LM head reads; "
      "models._expose_head_bias adds the missing .bias so an untied head's new rows train", ("finetune/models.py",),
      params=("name", "modules")),
    I("peft", "peft.utils.other.TrainableTokensWrapper.original_module",
      "the wrapped head whose bias models._expose_head_bias copies", ("finetune/models.py",)),
    I("bitsandbytes", "bitsandbytes.autograd._functions.MatmulLtState.SCB",
      "an 8-bit layer's row scales after its first forward (models.dequantize_8bit_layers)", ("finetune/models.py",)),
    I("bitsandbytes", "bitsandbytes.autograd._functions.MatMul8bitFp",
      "what a Linear8bitLt in training mode on a CPU computes through (bnb.matmul picks it from the layer's training "
      "flag): the int8 weights dequantised, fp32 activations. merge's reference for a CPU-trained 8-bit run runs the "
      "layers so (models.eight_bit_training_path); tests/test_eight_bit.py checks the arithmetic",
      ("finetune/models.py", "finetune/merge.py")),
    # --- peft: LoRA layer classes merge_lora checks before peft's merge_and_unload (which does the merging: DoRA,
    # token rows, modules_to_save; no LoRA layer attribute is read by our code any more)
    I("peft", "peft.tuners.lora.LoraLayer",
      "isinstance test for LoRA wrappers (merge.merge_lora)", ("finetune/merge.py",)),
    I("peft", "peft.tuners.lora.Linear",
      "peft's dense LoRA layer: merge_lora refuses any other LoraLayer (a quantized one would merge by "
      "re-quantising)", ("finetune/merge.py",)),
    I("peft", "peft.tuners.lora.LoraLayer.lora_dropout",
      "the ModuleDict of each LoRA layer's dropout (nn.Dropout or nn.Identity per adapter) that "
      "dropout.use_lane_dropout replaces on a CPU", ("finetune/dropout.py",), instance="_build_lora_linear"),
    # --- trl
    I("trl", "trl.SFTTrainer._save_checkpoint",
      "GuardedSFTTrainer's override does not call this one (trl 1.16's only writes a model card README.md into the "
      "checkpoint): when its code changes, check that skipping it is still harmless", ("finetune/guard.py",),
      params=("model", "trial"), source_sha="b6ee0a370c26"),
    # --- trl: the preference trainers (finetune/preference.py) take our token ids and our checkpoints
    I("trl", "trl.DPOTrainer._prepare_dataset",
      "skipped by GuardedDPOTrainer (it extracts prompts, appends EOS and tokenises; data/preference.py did all that "
      "with the run's template): when its code changes, check nothing else it does is lost",
      ("finetune/preference.py",), params=("dataset", "processing_class", "args", "dataset_name"),
      source_sha="35e349e8e826"),
    I("trl", "trl.KTOTrainer._prepare_dataset",
      "replaced by GuardedKTOTrainer, which keeps only its KL pairing (completions rotated by one within each batch): "
      "when its code changes, re-read it and port the change", ("finetune/preference.py",),
      params=("dataset", "processing_class", "args", "dataset_name"), source_sha="d22cf45470e6"),
    I("trl", "trl.DPOTrainer._save_checkpoint",
      "GuardMixin's override does not call this one (it only adds a model card): check skipping it stays harmless",
      ("finetune/guard.py", "finetune/preference.py"), params=("model", "trial"), source_sha="b6ee0a370c26"),
    I("trl", "trl.KTOTrainer._save_checkpoint", "as DPOTrainer._save_checkpoint", ("finetune/preference.py",),
      params=("model", "trial"), source_sha="b6ee0a370c26"),
    I("trl", "trl.experimental.cpo.CPOTrainer._save_checkpoint", "as DPOTrainer._save_checkpoint",
      ("finetune/preference.py",), params=("model", "trial"), source_sha="b6ee0a370c26"),
    I("trl", "trl.experimental.orpo.ORPOTrainer._save_checkpoint", "as DPOTrainer._save_checkpoint",
      ("finetune/preference.py",), params=("model", "trial"), source_sha="b6ee0a370c26"),
    I("trl", "trl.experimental.cpo.CPOTrainer.tokenize_row",
      "replaced by preference._cpo_row (simpo): the keys it returns are what that builds from our ids",
      ("finetune/preference.py",), params=("feature", "model"), source_sha="3406c058eeb7"),
    I("trl", "trl.experimental.orpo.ORPOTrainer.tokenize_row", "replaced by preference._cpo_row (orpo), as for CPO",
      ("finetune/preference.py",), params=("feature", "model"), source_sha="f1a72785ecfc"),
    # --- trl: the fused LM head SFTTrainer installs; finetune/loss.py serves its calls on devices without Triton
    I("trl", "trl.trainer.utils.add_fused_lm_head",
      "loss.install wraps the forward this patches in and answers `fused_lm_head=True` itself (same kwargs: labels, "
      "shift_labels, num_items_in_batch; same shift, -100 mask and loss): when its code changes, re-read it and port "
      "the change to finetune/loss.py", ("finetune/loss.py",), source_sha="422d009f04b6"),
    I("trl", "trl.trainer.utils.FusedCausalLMOutput",
      "the output loss.fused_output builds (loss, log_probs, entropy, is_top1, label_mask)", ("finetune/loss.py",),
      params=("loss", "log_probs", "entropy", "is_top1", "label_mask")),
    I("trl", "trl.SFTTrainer.compute_loss",
      "calls model(**inputs, fused_lm_head=True) and reads log_probs, entropy, is_top1, label_mask: what loss.install "
      "must return; when its code changes, check which fields it reads", ("finetune/loss.py",),
      params=("model", "inputs", "return_outputs", "num_items_in_batch"), source_sha="ca448211ff65"),
    I("trl", "trl.trainer.utils.compute_flops_per_token",
      "undocumented helper: FLOPs per token for the MFU figure", ("bench/gpu.py",)),
    I("trl", "trl.trainer.utils.get_peak_flops",
      "undocumented helper: a GPU's peak FLOP/s for the MFU figure", ("bench/gpu.py",)),
    # --- bitsandbytes: quantisation state and the CPU repacking switch
    I("bitsandbytes", "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu",
      "set to False so bnb never repacks NF4 weights for its bf16 CPU kernel (models.keep_training_nf4_layout)",
      ("finetune/models.py",), instance="_build_linear4bit"),
    I("bitsandbytes", "bitsandbytes.functional._convert_weight_packed_for_cpu",
      "the repacking (bf16 scales) that keep_training_nf4_layout prevents and merge refuses to merge from",
      ("finetune/models.py",), params=("qweight", "quant_state", "block_n")),
    I("bitsandbytes", "bitsandbytes.functional.QuantState.packing_format_for_cpu",
      "the repacking marks the QuantState with it: models.dequantize_4bit_layers refuses such a layer (its NF4 "
      "weights are lost)", ("finetune/models.py",), instance="_build_repacked_quant_state"),
    I("bitsandbytes", "bitsandbytes.functional.QuantState.absmax",
      "memory.model_bytes counts the tensors in vars(QuantState) (absmax, code, nested state2)",
      ("finetune/memory.py",), instance="_build_quant_state"),
    I("bitsandbytes", "bitsandbytes.nn.Params4bit",
      "matched by class name in models.four_bit_modules; quant_state read by models and memory",
      ("finetune/models.py", "finetune/memory.py")),
    I("bitsandbytes", "bitsandbytes.functional.dequantize_4bit",
      "dequant(NF4(W)) for the merge and for eval's CPU densify (models.dequantize_4bit_layers)",
      ("finetune/models.py",),
      params=("A", "quant_state")),
    # --- accelerate
    I("accelerate", "accelerate.commands.launch.launch_command_parser",
      "parses `accelerate launch` argv to learn --num_processes (distributed.requested_cpu_processes)",
      ("finetune/distributed.py",)),
    I("accelerate", "accelerate.commands.launch.launch_command_parser.num_processes",
      "read from the parsed `accelerate launch` arguments (with num_machines and config_file)",
      ("finetune/distributed.py",), instance="_build_launch_args"),
    I("accelerate", "accelerate.commands.launch.launch_command_parser.num_machines",
      "several machines on --cpu are left to mpirun", ("finetune/distributed.py",), instance="_build_launch_args"),
    I("accelerate", "accelerate.commands.launch.launch_command_parser.config_file",
      "num_processes may come from the accelerate config file instead", ("finetune/distributed.py",),
      instance="_build_launch_args"),
    # --- torch (profiler internals, the elastic launcher's entry points)
    I("torch", "torch.autograd.profiler.profile.kineto_results",
      "memory.step_peak_bytes reads allocation events from prof.profiler.kineto_results.events()",
      ("finetune/memory.py",), instance="_build_profile"),
    I("torch", "torch._C._autograd._KinetoEvent.nbytes",
      "allocation size of a [memory] event (with name, device_type, start_ns)", ("finetune/memory.py",)),
    I("torch", "torch._C._autograd._KinetoEvent.start_ns",
      "orders the allocation events", ("finetune/memory.py",)),
    I("torch", "torch._C._autograd._KinetoEvent.device_type",
      "keeps CPU allocation events", ("finetune/memory.py",)),
    I("torch", "torch.distributed.run.get_args_parser",
      "torchrun's argument parser: start N CPU ranks ourselves (distributed.relaunch_cpu_ranks)",
      ("finetune/distributed.py",)),
    I("torch", "torch.distributed.run.run",
      "torchrun's entry point, called with the parsed args", ("finetune/distributed.py",), params=("args",)),
    # --- numpy (transformers allowlists the same global for rng_state.pth)
    I("numpy", "numpy._core.multiarray._reconstruct",
      "allowlisted for weights_only torch.load of rng_state.pth (numpy<2 falls back to numpy.core)",
      ("finetune/checkpoints.py",)),
)

_BY_PATH = {r.path: r for r in RECORDS}


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _missing(record: Internal, why: str) -> InternalMissing:
    version = installed(record.package)
    have = f"{record.package} {version}" if version else f"this environment ({record.package} is not installed)"
    tested = TESTED.get(record.package)
    hint = f"finetune is tested with {record.package}<={tested}.x" if tested else "finetune was not tested with it"
    return InternalMissing(
        f"finetune relies on {record.path}, which {have} no longer has{why}; {hint} (see finetune/internals.py; "
        f"`pip install -e . -c constraints.txt` installs the tested versions)")


def _resolve(record: Internal, stop: int = 0):
    """Import the longest importable module prefix of record.path, then getattr the rest (all but the last
    `stop` components) and return what that gives."""
    parts = record.path.split(".")
    last_error = None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError as e:
            last_error = e
            continue
        rest = parts[i:len(parts) - stop] if stop else parts[i:]
        for j, name in enumerate(rest):
            obj = _attr(obj, name)
            if obj is _NOTHING:
                raise _missing(record, f" ({'.'.join(parts[:i + j])} has no {name})")
        return obj
    raise _missing(record, f" (cannot import {parts[0]}: {last_error})")


_NOTHING = object()


def _attr(obj, name: str):
    if hasattr(obj, name):
        return getattr(obj, name)
    # A dataclass field without a class-level default (default_factory) only exists on instances.
    return getattr(obj, "__dataclass_fields__", {}).get(name, _NOTHING)


def check(record: Internal):
    """Resolve one record: import its module, look up every component (on an instance built by the record's
    builder for run-time attributes), compare parameters. Raises InternalMissing naming the versions."""
    if record.instance is None:
        obj = _resolve(record)
        if record.params is not None and not isinstance(obj, property):
            _check_params(record, obj)
        if record.source_sha is not None:
            _check_source(record, obj)
        return obj
    _resolve(record, stop=1)  # the owner class itself must still be there
    owner = record.path.rsplit(".", 1)
    try:
        inst = globals()[record.instance]()
    except InternalMissing:
        raise
    except Exception as e:
        raise _missing(record, f" (building a {owner[0]} failed: {type(e).__name__}: {e})") from e
    if not hasattr(inst, owner[1]):
        raise _missing(record, f" (a {type(inst).__name__} instance has no {owner[1]})")
    return getattr(inst, owner[1])


def _check_params(record: Internal, fn) -> None:
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to compare
    # Named, not swallowed by **kwargs: we rely on what each parameter means.
    lacking = [p for p in record.params if p not in sig.parameters]
    # For an override, a new required parameter is as breaking as a removed one: the caller would pass it.
    required = [n for n, p in sig.parameters.items() if n != "self" and p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    extra = [p for p in required if p not in record.params]
    if lacking or extra:
        what = ", ".join([f"no parameter {p!r}" for p in lacking] + [f"a new required parameter {p!r}" for p in extra])
        raise _missing(replace(record, path=f"{record.path}({', '.join(record.params)})"),
                       f" (it now has {what}; signature {sig})")


def source_sha(obj) -> str:
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def _check_source(record: Internal, obj) -> None:
    now = source_sha(obj)
    if now != record.source_sha:
        version = installed(record.package)
        raise InternalMissing(
            f"finetune follows the code of {record.path}, which changed in {record.package} {version} (source "
            f"sha256 {now}, finetune was written against {record.source_sha}); finetune is tested with "
            f"{record.package}<={TESTED.get(record.package)}.x. To support it: re-read it, port the change to "
            f"{', '.join(record.used_in)}, then set source_sha={now!r} in finetune/internals.py")


def get(path: str):
    """The object at `path`, which must be a record of the table: the clear message instead of an ImportError.
    Checked once per process (callers may sit in per-example loops)."""
    if path not in _BY_PATH:
        raise KeyError(f"{path} is not listed in finetune/internals.py: add a record for it first")
    return _checked(_BY_PATH[path])


@functools.cache
def _checked(record: Internal):
    return check(record)


# ---------------------------------------------------------------------------------------------
# Builders of small instances for attributes that only exist at run time (CPU, no files, < 1 s each)


@functools.cache
def _build_4bit_tiny_llama():
    """A 1-layer LLaMA saved to a temporary directory and loaded back in NF4 (what from_pretrained leaves)."""
    import tempfile

    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        return LlamaForCausalLM.from_pretrained(
            d, dtype=torch.float32, device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32))


def _build_fast_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))


def _build_lora_linear():
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                           LoraConfig(r=2, lora_dropout=0.1, target_modules=["0"]))
    return model.base_model.model[0]


def _build_linear4bit():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(64, 64, quant_type="nf4")


def _build_quant_state():
    import torch
    from bitsandbytes.functional import quantize_4bit

    return quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)[1]


def _build_repacked_quant_state():
    """What bnb's CPU inference path makes of a layer's state (Linear4bit.forward in eval mode, no grad)."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    w, qs = quantize_4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True)
    return get("bitsandbytes.functional._convert_weight_packed_for_cpu")(w, qs)[1]


def _build_profile():
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ones(256).sum()
    return prof.profiler


def _build_launch_args():
    """What `accelerate launch --cpu --num_processes 2 train.py` parses to."""
    return get("accelerate.commands.launch.launch_command_parser")().parse_known_args(
        ["--cpu", "--num_processes", "2", "train.py"])[0]
