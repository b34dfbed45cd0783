"""The recipe: one YAML file that describes a complete run.

Every field is documented once, right beside it; that text is what `finetune --help` shows.
Loading never raises a traceback at the user: every problem is gathered and reported at once,
one line each, as `FILE: field.path: message (got VALUE)`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from finetune.errors import UserError

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("smollm2-135m-instruct",)
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")
"""A data file may be compressed: data.jsonl.gz reads as data.jsonl."""


class RecipeError(UserError):
    """A recipe that cannot be used. `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))

    def lines(self) -> list[str]:
        return list(self.problems)


def _reading_run_dir(info: ValidationInfo) -> bool:
    """True when a run directory's resolved.yaml is read back (load_resolved): its data and template files were
    checked when it was trained, and may have moved since or be relative to another directory."""
    return bool(info.context and info.context.get("run_dir"))


class _Section(BaseModel):
    # extra="forbid": an unknown key is a mistake to report, never something to drop silently.
    # use_attribute_docstrings: the docstring under each field is its one and only documentation.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class ModelSection(_Section):
    base: str
    """Base checkpoint: a hub id, a local HF directory, a path to a .gguf file, or builtin:smollm2-135m-instruct."""
    tokenizer: str | None = None
    """Tokenizer to use (hub id or local dir); null means the base model's own tokenizer."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint. Off unless you trust its author."""
    adapter: str | None = None
    """Start from an existing LoRA adapter instead of a fresh one: an adapter directory (e.g. an SFT run's
    adapter/) or a run directory holding one. SFT then DPO is two recipes; the manifest records its sha256."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. auto is sdpa (PyTorch's scaled-dot-product attention), and with data.packing it runs once
    per example inside a packed row (finetune/attention.py) instead of over the whole row with a block mask; sdpa
    is transformers' sdpa as it is; flash_attention_2 is used only when named here, and falls back to sdpa with a
    warning without CUDA and the flash-attn package."""

    @field_validator("base")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if v.startswith(BUILTIN_PREFIX) and v[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model; choose one of: {', '.join(BUILTIN_PREFIX + m for m in BUILTIN_MODELS)}")
        if not v.strip():
            raise ValueError("must name a base model (hub id, local directory, .gguf file or builtin:...)")
        if (v.endswith(".gguf") or v.startswith(("/", "./", "../", "~"))) and not Path(v).expanduser().exists():
            raise ValueError("file or directory not found (give an existing HF model directory or .gguf file)")
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or _reading_run_dir(info):
            return v
        p = Path(v).expanduser()
        if not ((p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file()):
            raise ValueError("no adapter here: give a directory holding adapter_config.json (an SFT run's adapter/) "
                             "or a run directory with a finished adapter/")
        return v


class QuantizationSection(_Section):
    load_in_4bit: bool = True
    """Load the frozen base in 4-bit (QLoRA). false trains LoRA on a base in the compute dtype."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (QLoRA's NormalFloat4) or fp4."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.37 bit per parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the matmuls and autocast. bfloat16 falls back to float32, with a warning, where unsupported."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage dtype of packed 4-bit weights; set it to the compute dtype for FSDP so the weights can shard."""
    load_in_8bit: bool = False
    """Load the frozen base in 8-bit (bitsandbytes LLM.int8) instead: the third choice beside 4-bit and none. Setting
    it turns load_in_4bit off unless that is also set (both true is an error)."""

    @model_validator(mode="before")
    @classmethod
    def _eight_bit_replaces_four(cls, data):
        if isinstance(data, dict) and data.get("load_in_8bit") is True and "load_in_4bit" not in data:
            return {**data, "load_in_4bit": False}
        return data

    @model_validator(mode="after")
    def _one_quantization(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both true; choose one (or neither for a 16-bit base)")
        return self


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Modules to adapt: all-linear, or a list of names such as [q_proj, v_proj]."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r (peft's use_rslora)."""
    use_dora: bool = False
    """DoRA: a learned magnitude per output row on top of the LoRA direction (peft's use_dora). On a 4-bit base
    this is QDoRA; it costs one extra vector per adapted layer and a weight-norm computation per step."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"] = "default"
    """How LoRA A/B start (peft's init_lora_weights). default: B = 0 (the adapter starts as a no-op); gaussian;
    pissa / olora: from the SVD / QR of the base weight, which is rewritten as the residual (16-bit base only; the
    adapter is saved converted to plain LoRA on the original base); loftq: A/B fitted to the 4-bit quantisation
    error, W - dequant(NF4(W)) (4-bit base only, needs a CUDA GPU); eva: from the SVD of the layers' inputs on
    eva_batches batches of the training data (ranks are redistributed, see eva_rho)."""
    loftq_iter: int = Field(1, gt=0)
    """init: loftq: alternating iterations (peft's LoftQConfig.loftq_iter)."""
    eva_batches: int = Field(8, gt=0)
    """init: eva: batches of training data whose layer inputs are decomposed (at supervised positions). Each holds
    at least train.micro_batch_size examples and at least round(r x eva_rho) supervised tokens (peft skips a smaller
    batch); peft cycles over them until the components stop moving, at most 50 passes."""
    eva_rho: float = Field(2.0, ge=1)
    """init: eva: rank redistribution (peft's EvaConfig.rho); 1 keeps r in every layer, larger lets a layer
    take up to rho * r."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. [lm_head] or [embed_tokens] (peft's
    modules_to_save). Listing embed_tokens/lm_head makes the new tokens of data.add_tokens train through the
    whole matrix instead of only their rows."""
    layers_to_transform: list[int] | None = None
    """Adapt only these decoder layers (indices from 0), e.g. [0, 1]. Needs target_modules as a list."""
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    """Per-module ranks overriding r: a name or regex -> rank, e.g. {q_proj: 32} or {'layers\\.0\\.': 4}."""
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    """Per-module alphas overriding alpha, keyed like rank_pattern."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must list at least one module name, or be all-linear")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, r in v.items() if r <= 0]
        if bad:
            raise ValueError(f"ranks must be positive integers ({bad[0]!r} is not)")
        return v

    @field_validator("layers_to_transform")
    @classmethod
    def _layer_indices(cls, v):
        if v is not None and (not v or min(v) < 0):
            raise ValueError("list one or more layer indices >= 0, or leave it null for every layer")
        return v

    @model_validator(mode="after")
    def _peft_combinations(self):
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("lora.layers_to_transform needs lora.target_modules as a list (e.g. [q_proj, v_proj]); "
                             "peft cannot combine it with all-linear")
        return self


DataFormat = Literal["alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference",
                     "preference_messages", "kto"]
PREFERENCE_FORMATS = ("preference", "preference_messages", "kto")
"""Formats of preference methods: pairs (prompt, chosen, rejected) or kto's unpaired (prompt, completion, label)."""


class DataSource(_Section):
    path: str
    """A local .json/.jsonl/.csv/.parquet file, a directory of them, or a hub dataset id."""
    format: DataFormat = "alpaca"
    """Row format: alpaca | messages | sharegpt | prompt_completion | text (SFT); preference (prompt, chosen,
    rejected strings) | preference_messages (chosen and rejected message lists sharing the prompt turns) | kto
    (prompt, completion, label true/false) for the preference methods."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Map our field names to yours, e.g. {instruction: question, output: answer}."""
    split: str = "train"
    """Split to read from a hub dataset (or a local file that has several)."""
    weight: float | None = Field(None, gt=0)
    """Relative sampling weight when mixing sources (rows are repeated or subsampled, seeded)."""
    max_samples: int | None = Field(None, gt=0)
    """Use at most this many rows of this source (a seeded sample)."""

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        if _reading_run_dir(info):
            return v
        if looks_local(v) and not Path(v).expanduser().exists():
            raise ValueError("file not found (relative paths are resolved from the current directory)")
        return v


class DataSection(_Section):
    train: list[DataSource] = Field(min_length=1)
    """Training sources; several can be mixed."""
    eval: list[DataSource] | None = None
    """Explicit held-out sources; when set, held_out must be 0."""
    held_out: float = Field(0.0, ge=0)
    """Rows split off for evaluation: a fraction in (0, 1), or a count >= 1. Saved as held_out.jsonl."""
    template: str = "alpaca"
    """Chat template: a name in data_templates/, a path to your own .jinja file, or `tokenizer` for the model's own."""
    system_prompt: str | None = None
    """System message added to rows that have none (templates without a system slot ignore it)."""
    max_length: int = Field(1024, gt=0)
    """Longest tokenised example (and the most tokens a packed block holds)."""
    train_on_prompt: bool = False
    """Also supervise prompt tokens. Default: loss on assistant replies only."""
    packing: bool = True
    """Pack examples into blocks of at most max_length tokens (padding-free; attention never crosses examples).
    A step still holds micro_batch_size x grad_accum examples on average, so an epoch has the unpacked number of
    steps (finetune/data/packing.py). No compute is spent on padding: bench/RESULTS.md measures the gain."""
    group_by_length: bool = False
    """With packing off: put examples of similar length in the same batch (less padding, a less random order)."""
    too_long: Literal["truncate", "drop", "error"] = "truncate"
    """What to do with an example longer than max_length. Rows left with no supervised token are dropped and counted."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops the run (error) or is skipped and counted in the report (skip)."""
    add_tokens: list[str] = Field(default_factory=list)
    """Special tokens to add to the tokenizer, e.g. ['<tool_call>']. The embeddings grow and only the new rows
    train (peft's trainable_token_indices, input and output embeddings), unless lora.modules_to_save lists the
    embedding; the tokenizer with the new tokens is saved with the adapter."""
    add_template_tokens: bool = False
    """Add the template's special tokens the tokenizer lacks (e.g. <|im_start|>, <|im_end|> for chatml on a base
    without them), trained like add_tokens. Off: such a template is refused."""

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str, info: ValidationInfo) -> str:
        from finetune.templates import template_problem  # templates imports nothing of ours

        if _reading_run_dir(info):
            return v

        problem = template_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("held_out")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("must be a fraction below 1 (e.g. 0.05) or a whole count of rows (e.g. 20)")
        return v

    @model_validator(mode="after")
    def _one_held_out_source(self):
        if self.eval and self.held_out:
            raise ValueError("set either data.eval (an explicit held-out file) or data.held_out, not both")
        return self


class TrainSection(_Section):
    method: Literal["sft", "dpo", "orpo", "kto", "simpo"] = "sft"
    """sft (supervised replies) | dpo | orpo | kto | simpo (preference tuning on the same 4-bit base and LoRA;
    their keys are in the preference: section)."""
    epochs: float = Field(1, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    micro_batch_size: int = Field(4, gt=0)
    """Examples per device per forward pass."""
    grad_accum: int = Field(4, gt=0)
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    seed: int = 42
    """Seed for data order, LoRA init and dropout."""
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = "auto"
    """auto: paged_adamw_8bit on CUDA (the QLoRA paper's), adamw_torch elsewhere."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: saves memory, costs about a third more compute. auto: off
    when `finetune plan` says the run fits without it (in 80% of the GPU's memory, or half the available RAM on
    a CPU), on otherwise. The decision and its numbers go to the log, the manifest and report.md."""
    logging_steps: int = Field(1, gt=0)
    """Log loss and learning rate every N optimizer steps."""
    save_steps: int = Field(100, gt=0)
    """Save a full checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: int | None = Field(2, gt=0)
    """Keep at most this many checkpoints (oldest deleted first)."""
    eval_steps: int | None = Field(None, gt=0)
    """Compute held-out loss every N optimizer steps (default: every fifth of the run, total_steps // 5)."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = ["tensorboard"]
    """Experiment trackers; tensorboard writes event files into the run directory."""
    on_nan: Literal["stop", "skip_step"] = "stop"
    """A non-finite loss or gradient norm stops the run, or the step is skipped and counted."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto uses CUDA when present."""


PreferenceLoss = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                         "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "kto",
                         "apo_zero_unpaired"]


class PreferenceSection(_Section):
    """Keys of the preference methods (train.method dpo | orpo | kto | simpo). A key that the chosen method does
    not use is an error naming it. Unset keys take TRL's default for the method."""

    beta: float | None = Field(None, gt=0)
    """Strength of the pull towards the reference (dpo, kto: TRL default 0.1), ORPO's odds-ratio weight (lambda,
    0.1), or SimPO's reward scale (2.0)."""
    loss_type: PreferenceLoss | list[PreferenceLoss] | None = None
    """dpo: sigmoid (DPO, default) | hinge | ipo | robust | exo_pair | nca_pair | bco_pair | sppo_hard | aot |
    aot_unpaired | apo_zero | apo_down | discopop | sigmoid_norm | sft, or a list of them summed with loss_weights
    (e.g. [sigmoid, sft]: DPO plus the chosen reply's NLL, which keeps the chosen reply likely); kto: kto (default) |
    apo_zero_unpaired."""
    loss_weights: list[float] | None = None
    """dpo: one weight per entry of a loss_type list (default: 1.0 each)."""
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    """dpo: probability that a label is flipped (robust and exo_pair losses; 0 = none)."""
    reference: Literal["start", "base", "precomputed"] | None = None
    """dpo, kto: the reference model, never a second copy of the base. start (default): the model training starts
    from, i.e. the 4-bit base with the starting adapter (model.adapter) frozen, or with the adapter off when there is
    none; base: the base with every adapter off; precomputed: start's log-probabilities computed once before
    training (no reference forward pass per step)."""
    simpo_gamma: float | None = Field(None, ge=0)
    """simpo: target reward margin (TRL default 0.5)."""
    desirable_weight: float | None = Field(None, gt=0)
    """kto: weight of the desirable (label true) examples' loss (1.0)."""
    undesirable_weight: float | None = Field(None, gt=0)
    """kto: weight of the undesirable (label false) examples' loss (1.0)."""
    max_prompt_length: int | None = Field(None, gt=0)
    """Longest prompt in tokens (default: half of data.max_length). A longer prompt keeps its last tokens (the
    turn being answered); replies then keep their first data.max_length - prompt tokens. Both are counted."""


PREFERENCE_KEYS = {
    "dpo": {"beta", "loss_type", "loss_weights", "label_smoothing", "reference", "max_prompt_length"},
    "kto": {"beta", "loss_type", "reference", "desirable_weight", "undesirable_weight", "max_prompt_length"},
    "orpo": {"beta", "max_prompt_length"},
    "simpo": {"beta", "simpo_gamma", "max_prompt_length"},
}
"""The preference: keys each method reads (anything else set is an error)."""
KTO_LOSSES = ("kto", "apo_zero_unpaired")


class EvalTask(_Section):
    name: str
    """Name shown in the report."""
    kind: Literal["held_out", "generate", "multiple_choice", "lm_eval", "preference"]
    """held_out | generate | multiple_choice | lm_eval | preference (on pairs: how often the chosen reply gets a
    higher length-normalised log-likelihood than the rejected one; path: a preference/preference_messages JSONL
    file, or none for the run's held-out pairs)."""
    path: str | None = None
    """JSONL file of the task's rows (generate, multiple_choice)."""
    metrics: list[Literal["exact_match", "contains", "regex", "json_match", "rouge_l", "chrf"]] = ["exact_match"]
    """Generation metrics (held_out, generate): exact_match, contains, regex, json_match (strict JSON, fraction
    of fields equal), rouge_l, chrf. held_out adds loss and perplexity; every generation task adds stop_rate."""
    normalize: list[Literal["lower", "strip", "punctuation", "whitespace", "articles"]] = ["strip"]
    """Normalisations applied before exact_match/contains/regex."""
    pattern: str | None = None
    """Regular expression for the regex metric: without references it checks the format; with references
    its first match (group 1 if any) must equal one."""
    max_new_tokens: int = Field(64, gt=0)
    """Generation budget per prompt."""
    lm_eval_tasks: list[str] = Field(default_factory=list)
    """lm-evaluation-harness task names (kind lm_eval)."""
    include_path: str | None = None
    """Directory of local lm-eval task YAMLs (kind lm_eval)."""
    apply_chat_template: bool = False
    """lm_eval: wrap each prompt in the run's chat template (lm-eval's --apply_chat_template). Off by
    default, as in lm-eval's published numbers."""


class EvalSection(_Section):
    tasks: list[EvalTask] = Field(default_factory=list)
    """Tasks run on the base and on the fine-tuned model."""
    model: Literal["adapter", "merged", "both"] = "adapter"
    """Evaluate the fine-tuned model as the adapter on its 4-bit base, the merged model, or both."""
    batch_size: int = Field(8, gt=0)
    """Prompts per generation batch."""
    limit: int | None = Field(None, gt=0)
    """Use at most N rows per task (a quick check)."""
    bootstrap: int = Field(1000, gt=0)
    """Bootstrap resamples for the 95% confidence interval of each delta."""


GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                   "q4_1", "q4_0", "iq4_nl", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]


class ExportSection(_Section):
    formats: list[Literal["hf", "adapter", "gguf", "gguf_adapter", "ollama"]] = Field(default_factory=list)
    """Formats `finetune run` writes after merging."""
    gguf_type: list[GGUFType] = Field(default_factory=lambda: ["f16"], min_length=1)
    """GGUF type(s): one (gguf_type: q4_k_m) or a list ([f16, q8_0, q5_k_m, q4_k_m]). f32/f16/bf16 are written
    in Python; the others by llama.cpp's own quantizer from the f16 file. Several types: `finetune run` also writes
    the fidelity ladder (as verify: true does), which measures what each costs the fine-tune."""

    @field_validator("gguf_type", mode="before")
    @classmethod
    def _one_or_several(cls, v):
        return [v] if isinstance(v, str) else v
    verify: bool = False
    """Check the GGUF against HF in llama.cpp (needs llama-cpp-python)."""


class Recipe(_Section):
    model: ModelSection
    """The base model."""
    quantization: QuantizationSection = QuantizationSection()
    """How the frozen base is loaded."""
    lora: LoraSection = LoraSection()
    """The LoRA adapters."""
    data: DataSection
    """Training data and its template."""
    train: TrainSection = TrainSection()
    """The optimisation."""
    preference: PreferenceSection | None = None
    """Keys of the preference methods (train.method dpo | orpo | kto | simpo)."""
    eval: EvalSection = EvalSection()
    """Held-out tasks, base vs fine-tuned."""
    export: ExportSection = ExportSection()
    """What `finetune run` exports."""
    output_dir: str
    """Run directory: resolved recipe, manifest, logs, checkpoints, adapter, reports."""


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> Recipe, or RecipeError with every problem.


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError listing every problem."""
    path = Path(path)
    label = str(path)
    if not path.is_file():
        raise RecipeError([f"{label}: file not found (check the path to the recipe)"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{label}: cannot read recipe ({e.__class__.__name__}: {e})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError([f"{where}: invalid YAML: {problem} (fix the syntax on that line)"]) from None
    except Exception as e:  # noqa: BLE001
        # PyYAML's constructors raise plain Python errors on some tagged scalars (`!!float` with no value -> IndexError,
        # `!!bool` -> KeyError, `!!int x` -> ValueError): still just invalid YAML to the user.
        raise RecipeError([f"{label}: invalid YAML: {e.__class__.__name__}: {e} (check the explicit !!tags)"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"{label}: a recipe must be a mapping of sections (model:, data:, ...), got {type(raw).__name__}"])
    problems: list[str] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as e:
            problems.append(f"{label}: override {item!r}: {e}")
    if problems:
        raise RecipeError(problems)
    return validate_recipe(raw, label)


def validate_recipe(raw: dict, label: str = "recipe") -> Recipe:
    """Validate a plain dict; also checks that local data files and templates exist."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError([f"{label}: {line}" for line in _describe_errors(e, raw)]) from None
    problems = [f"{label}: {p}" for p in _check_paths(recipe) + _method_problems(recipe)]
    if problems:
        raise RecipeError(problems)
    return recipe


def load_resolved(path: str | Path) -> Recipe:
    """Read back RUN/resolved.yaml for the stages after training (merge, export, eval), from any directory.

    The schema is checked; the existence of data and template files is not (see _reading_run_dir).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: missing; this does not look like a run directory written by `finetune train`"])
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return Recipe.model_validate(raw, context={"run_dir": True})
    except ValidationError as e:
        raise RecipeError([f"{path}: {line}" for line in _describe_errors(e, raw)]) from None


def _describe_errors(err: ValidationError, raw: dict) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = _user_loc(e["loc"], raw)
        field = _dotted(loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key{_suggest(loc)}")
            continue
        if e["type"] == "missing":
            lines.append(f"{field}: required key is missing (add it; see `finetune validate --help`)")
            continue
        if e["type"] == "invalid_key":  # YAML read `false:` / `1:` as a non-string key; pydantic gives its position
            where = _dotted(list(loc[:-1]) + [e["input"]])  # the key itself, e.g. model[False]
            lines.append(f"{where}: key {_show(e['input'])} is not a string; write it in quotes (\"{_show(e['input'])}\": ...) "
                         "or use the key you meant")
            continue
        got = _lookup(raw, loc)
        msg = _friendly(e)
        lines.append(f"{field}: {msg} (got {_show(got)})")
    # One problem per field: union branches can report the same field twice.
    seen, unique = set(), []
    for line in lines:
        key = line.split(":")[0]
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return unique


_TYPE_TAGS = frozenset({"bool", "int", "float", "str", "none", "bytes", "decimal"})
"""The names pydantic gives scalar union branches in a loc; no recipe field is called that."""


def _user_loc(loc, raw) -> list:
    """pydantic adds union-branch tags ("list[str]", "literal[...]", "function-after[...]") to loc; they mean
    nothing to a user. Drop them, but never a key the user actually wrote (a key may be spelled "[")."""
    out, cur, at_value = [], raw, False
    for p in loc:
        present = (isinstance(cur, dict) and _has_key(cur, p)) or (
            isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur))
        if present:
            out.append(p)
            cur = cur[p]
            at_value = not isinstance(cur, (dict, list))
        elif at_value or (isinstance(p, str) and (isinstance(cur, list) or p in _TYPE_TAGS)):
            # Past a scalar the user wrote, what follows is ours (a union-branch tag, or the index of the list a
            # validator wrapped it in, as `gguf_type: q4_k_m` -> [q4_k_m]); likewise a type tag in a list or mapping.
            continue
        elif not (isinstance(p, str) and ("[" in p or p.startswith("function-"))):
            out.append(p)
            cur = None
    return out


def _has_key(d: dict, key) -> bool:
    try:
        return key in d
    except TypeError:  # unhashable
        return False


def _friendly(e: dict) -> str:
    t, ctx = e["type"], e.get("ctx", {})
    if t in ("greater_than", "greater_than_equal") and e.get("input") is not None:
        kind = "integer" if isinstance(e["input"], int) and not isinstance(e["input"], bool) else "number"
        bound = ctx.get("gt", ctx.get("ge"))
        if bound == 0:
            return f"must be a {'positive' if t == 'greater_than' else 'non-negative'} {kind}"
        return f"must be {'>' if t == 'greater_than' else '>='} {bound}"
    if t == "less_than":
        return f"must be < {ctx.get('lt')}"
    if t == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if t in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if t in ("float_type", "float_parsing"):
        return "must be a number"
    if t in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if t in ("string_type",):
        return "must be a string"
    if t in ("list_type",):
        return "must be a list"
    if t in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping of keys (a YAML section)"
    if t == "too_short":
        return "must not be empty"
    msg = e["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _fields_at(loc: list) -> list[str]:
    """Known field names of the section that `loc` points into."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return []
        ann = info.annotation
        model = _section_type(ann)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _section_type(ann):
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "lora_target_modules": "target_modules", "lr": "learning_rate", "batch_size": "micro_batch_size",
           "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "sequence_len": "max_length"}
"""What other tools call our keys (peft, axolotl, TRL): the suggestion names ours."""


def _suggest(loc: list) -> str:
    known = _fields_at(loc)
    if loc and ALIASES.get(str(loc[-1])) in known:
        return f" (did you mean {_dotted(list(loc[:-1]) + [ALIASES[str(loc[-1])]])}?)"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.3) if known and loc else []
    if close:
        return f" (did you mean {_dotted(list(loc[:-1]) + [close[0]])}?)"
    return f" (known keys here: {', '.join(known)})" if known else " (remove it)"


def _dotted(loc) -> str:
    out = ""
    for p in loc:
        if isinstance(p, str) and (not p or any(c in p for c in ". :[]")):
            p = repr(p)  # an empty or odd key must still be visible: '' rather than nothing
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _lookup(raw: Any, loc) -> Any:
    cur = raw
    for p in loc:
        try:
            cur = cur[p]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").removesuffix(" ...")
    return text if len(text) <= 60 else text[:57] + "..."


def _check_paths(recipe: Recipe) -> list[str]:
    """Cross-field checks that need the whole recipe."""
    problems = lora_quantization_problems(recipe)
    for i, task in enumerate(recipe.eval.tasks):
        if task.kind in ("generate", "multiple_choice") and not task.path:
            problems.append(f"eval.tasks[{i}].path: required for kind {task.kind} (give a JSONL file)")
        elif task.path and not Path(task.path).exists():
            problems.append(f"eval.tasks[{i}].path: file not found (got {task.path!r})")
        if task.kind == "lm_eval" and not task.lm_eval_tasks:
            problems.append(f"eval.tasks[{i}].lm_eval_tasks: list at least one lm-eval task name")
        if "regex" in task.metrics and not task.pattern:
            problems.append(f"eval.tasks[{i}].pattern: required by the regex metric")
        if task.include_path and not Path(task.include_path).is_dir():
            problems.append(f"eval.tasks[{i}].include_path: directory not found (got {task.include_path!r})")
        if [t.name for t in recipe.eval.tasks].count(task.name) > 1:
            problems.append(f"eval.tasks[{i}].name: {task.name!r} is used by another task; names must be unique")
    return problems


def _loss_problems(method: str, pref) -> list[str]:
    """preference.loss_type / loss_weights against the method: kto takes one of its own losses, dpo one or a list
    of the others, and a weight per listed loss."""
    losses = pref.loss_type if isinstance(pref.loss_type, list) else [] if pref.loss_type is None else [pref.loss_type]
    problems = [f"preference.loss_type: {x!r} is not a {method} loss" for x in losses
                if (x in KTO_LOSSES) != (method == "kto")]
    if method == "kto" and isinstance(pref.loss_type, list):
        problems.append("preference.loss_type: kto takes one loss, not a list")
    if pref.loss_type == []:
        problems.append("preference.loss_type: an empty list; name at least one loss (e.g. [sigmoid, sft])")
    if pref.loss_weights is not None and len(pref.loss_weights) != max(1, len(losses)):
        problems.append(f"preference.loss_weights: {len(pref.loss_weights)} weights for {max(1, len(losses))} "
                        "loss_type entries; give one weight per loss")
    return problems


def _method_problems(recipe: Recipe) -> list[str]:
    """Keys and data formats that do not belong to train.method, each naming its field."""
    method, pref, problems = recipe.train.method, recipe.preference, []
    preference = method != "sft"
    if pref is not None and not preference:
        problems.append("preference: only used by a preference method; set train.method to dpo, orpo, kto or simpo, "
                        "or remove the section")
    if pref is not None and preference:
        for key in sorted(pref.model_fields_set - PREFERENCE_KEYS[method]):
            problems.append(f"preference.{key}: not used by train.method {method} (it reads: "
                            f"{', '.join(sorted(PREFERENCE_KEYS[method]))}); remove it")
        if "loss_type" in PREFERENCE_KEYS[method]:
            problems += _loss_problems(method, pref)
    wanted = ("kto",) if method == "kto" else ("preference", "preference_messages") if preference else None
    for part, sources in (("train", recipe.data.train), ("eval", recipe.data.eval or [])):
        for i, src in enumerate(sources):
            if wanted is None and src.format in PREFERENCE_FORMATS:
                problems.append(f"data.{part}[{i}].format: {src.format} is preference data; set train.method "
                                "(dpo, orpo, simpo for pairs; kto for kto rows)")
            elif wanted is not None and src.format not in wanted:
                problems.append(f"data.{part}[{i}].format: train.method {method} reads {' or '.join(wanted)} rows "
                                f"(got {src.format})")
    if preference and recipe.data.train_on_prompt:
        problems.append(f"data.train_on_prompt: not used by train.method {method} (the loss is on the replies)")
    if preference and "packing" in recipe.data.model_fields_set and recipe.data.packing:
        problems.append(f"data.packing: train.method {method} does not pack (chosen and rejected are batched "
                        "together); remove it")
    if recipe.model.adapter and not recipe.lora.model_fields_set <= {"dropout"}:
        problems.append("lora: the starting adapter (model.adapter) fixes the LoRA shape; remove lora.r, "
                        "lora.alpha and lora.target_modules")
    return problems


def lora_quantization_problems(recipe: Recipe) -> list[str]:
    """LoRA options that peft cannot apply to the base as the recipe loads it: one line each, saying what works."""
    lora, q = recipe.lora, recipe.quantization
    problems = []
    bits = "4-bit" if q.load_in_4bit else "8-bit" if q.load_in_8bit else None
    if lora.init in ("pissa", "olora") and bits:
        problems.append(f"lora.init: {lora.init} rewrites the base weights as a full-precision residual, which a "
                        f"{bits} base cannot hold as trained (peft re-quantises or refuses it); on a {bits} base use "
                        "init: default, gaussian, eva" + (" or loftq" if q.load_in_4bit else "") +
                        f", or set quantization.load_in_4bit: false (and load_in_8bit: false) for {lora.init}")
    if lora.init == "loftq" and not q.load_in_4bit:
        problems.append("lora.init: loftq fits LoRA to the 4-bit quantisation error, and this base is not loaded in "
                        "4-bit; use it with quantization.load_in_4bit: true, or init: default/pissa/olora here")
    if lora.init in ("pissa", "olora", "loftq") and lora.use_dora:
        problems.append(f"lora.use_dora: DoRA with init: {lora.init} is not supported here (peft's weight "
                        "conversion is for plain LoRA); use init: default, gaussian or eva with DoRA")
    return problems


def looks_local(path: str) -> bool:
    """A data path is local if it exists, has a data-file suffix, or is written as a path; else a hub id."""
    p = Path(path)
    if p.suffix in COMPRESSED_SUFFIXES:
        p = p.with_suffix("")
    return p.exists() or p.suffix in LOCAL_DATA_SUFFIXES or path.startswith(("/", "./", "../", "~")) or path.count("/") > 1


# ---------------------------------------------------------------------------------------------
# Overrides: `lora.r=8 train.max_steps=20 data.train[0].path=x.jsonl`

_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def apply_override(raw: dict, item: str) -> None:
    """Set a dotted key in the raw recipe dict. The value is parsed as YAML, so 8 -> int, true -> bool."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError("expected KEY=VALUE, e.g. lora.r=8")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except Exception:  # noqa: BLE001 - any YAML failure (see load_recipe): take it as the plain string typed
        parsed = value
    steps: list[str | int] = []
    for part in key.strip().split("."):
        m = _PART.match(part)
        if not m:
            raise ValueError(f"bad key segment {part!r}; use dotted names like train.max_steps or data.train[0].path")
        steps.append(m.group(1))
        steps.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    cur: Any = raw
    for step, nxt in zip(steps, steps[1:]):
        if isinstance(step, int):
            if not isinstance(cur, list) or step >= len(cur):
                raise ValueError(f"index [{step}] is out of range")
            if not isinstance(cur[step], (dict, list)):
                cur[step] = {} if isinstance(nxt, str) else []
            cur = cur[step]
        else:
            if not isinstance(cur, dict):
                raise ValueError(f"{step!r} is not inside a section")
            if not isinstance(cur.get(step), (dict, list)):
                cur[step] = {} if isinstance(nxt, str) else []
            cur = cur[step]
    last = steps[-1]
    if isinstance(last, int):
        if not isinstance(cur, list) or last >= len(cur):
            raise ValueError(f"index [{last}] is out of range")
        cur[last] = parsed
    else:
        if not isinstance(cur, dict):
            raise ValueError(f"{last!r} is not inside a section")
        cur[last] = parsed


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def field_docs(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field, for --help."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(info.annotation)
        if sub is not None and sub is not DataSource and sub is not EvalTask:
            rows.append((key, "", info.description or ""))
            rows.extend(field_docs(sub, key + "."))
        elif sub in (DataSource, EvalTask):
            rows.append((key, "[]", info.description or ""))
            rows.extend(field_docs(sub, key + "[]."))
        else:
            default = "required" if info.is_required() else _show(info.get_default(call_default_factory=True))
            rows.append((key, default, info.description or ""))
    return rows
