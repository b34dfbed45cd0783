"""`finetune train`: Recipe -> checked tokenizer + data -> 4-bit base + LoRA -> TRL SFTTrainer -> adapter/.

Reads top to bottom: setup (run dir, hardware, tokenizer, data, model) -> train -> save.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import attention
from finetune import checkpoints as ck
from finetune import data as data_mod
from finetune import distributed, dropout, rundir
from finetune import resume as resume_mod
from finetune.data.packing import StepShape, pack
from finetune.hardware import choose_precision, detect_hardware
from finetune.models import (EvaError, LoraHardwareError, add_new_tokens, align_special_ids, attach_lora,
                             check_bnb_runs_on_this_cpu, eva_min_tokens, load_base, load_tokenizer,
                             lora_hardware_problem, quantized_base, resize_for_tokenizer, resolve_base)
from finetune.recipe import Recipe, recipe_to_yaml
from finetune.report import write_report
from finetune.start_adapter import load_start_adapter, start_adapter_record
from finetune.templates import check_tokenizer_supports, load_template

log = logging.getLogger("finetune")


RunDirError = rundir.RunDirError


def check_run_dir(run: Path, resume: bool) -> None:
    # Checkpoints (complete ones only) are judged by resume.plan, under the run lock.
    if rundir.adapter_complete(run) and not resume:
        raise RunDirError(f"{run}: already holds a finished adapter; choose another output_dir "
                          f"(e.g. output_dir={run}-2) or delete {run} to train again")


def resume_command(recipe_path, overrides) -> str:
    """The exact command that continues this run (printed on SIGTERM, NaN stop, disk full)."""
    return f"cd {shlex.quote(os.getcwd())} && finetune train {shlex.join([str(recipe_path), *overrides])} --resume"


def _event(run: Path, kind: str, **details) -> None:
    """add_event that never hides the error being reported (the disk may be the thing that is full)."""
    try:
        rundir.add_event(run, kind, **details)
        if kind in ("interrupted", "stopped_non_finite"):  # the run ends here: report.md must say so
            write_report(run)
    except OSError as e:
        log.warning("could not record %s in the manifest: %s", kind, e)


def sft_config(recipe: Recipe, precision, hw, run: Path, has_eval: bool, shape: StepShape,
               gradient_checkpointing: bool | None = None):
    """Map the recipe onto SFTConfig. Every precision flag is set explicitly (SFTConfig defaults to bf16=True).
    shape: how examples become steps (data.packing.step_shape: a packed step holds as many examples as an
    unpacked one). gradient_checkpointing: the resolved decision (plan.checkpointing_for_run); None = on."""
    from trl import SFTConfig

    if gradient_checkpointing is None:
        gradient_checkpointing = recipe.train.gradient_checkpointing is not False

    t, d = recipe.train, recipe.data
    micro, accum = shape.per_device, shape.accum
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = t.max_steps or max(1, math.ceil(shape.steps_per_epoch * t.epochs))
    eval_steps = t.eval_steps or max(1, total // 5)
    report_to = [r for r in t.report_to if r != "none"] or "none"
    return SFTConfig(
        output_dir=str(run / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=precision.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=not hw.cuda,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        report_to=report_to,
        # Packed: our own blocks (data.packing.pack: a step holds as many examples as unpacked), already built,
        # so TRL neither packs nor truncates; padding-free collation restarts position_ids at every example.
        max_length=None if shape.packed else d.max_length,
        packing=False,
        padding_free=shape.packed,
        dataset_kwargs={"skip_prepare_dataset": True} if shape.packed else None,
        train_sampling_strategy="group_by_length" if d.group_by_length and not d.packing else "random",
        # Our dataset already carries labels (assistant-only, EOS supervised); TRL must not rebuild them.
        assistant_only_loss=False,
        completion_only_loss=False,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        disable_tqdm=False,
        ddp_find_unused_parameters=False if world > 1 else None,
    )


class JsonlLogCallback:
    """Append every trainer log (loss, lr, grad norm, eval loss) to train_log.jsonl on the main process."""

    def __new__(cls, path: Path):
        from transformers import TrainerCallback

        class _Cb(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if state.is_world_process_zero and logs:
                    with open(path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

        return _Cb()


def keep_adapter_fp32(model) -> None:
    """Undo TRL's cast of QLoRA adapter weights to bf16.

    SFTTrainer casts trainable parameters of quantized models to bf16 regardless of the compute dtype. In fp32
    compute (CPU) that silently trains bf16 weights whose small AdamW updates round away; with bf16 compute,
    fp32 master weights under autocast are what PEFT does by default. The optimizer is built later, in
    train(), so it sees the fp32 tensors.
    """
    import torch

    for _, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def load_tokenizer_and_template(recipe: Recipe, new_token_ids: list | None = None):
    """The base source, its checked tokenizer and the run's template, refusing a template the tokenizer can't express.

    data.add_tokens, and with data.add_template_tokens the template's missing tokens, are added to the tokenizer
    first; their ids are appended to `new_token_ids`.
    """
    source = resolve_base(recipe.model.base)
    tok = load_tokenizer(recipe, source)
    template = load_template(recipe.data.template, tok)
    wanted = list(recipe.data.add_tokens)
    if recipe.data.add_template_tokens:
        wanted += check_tokenizer_supports(template, tok)
    added = add_new_tokens(tok, wanted)
    if added:
        log.info("added %d tokens to the tokenizer: %s", len(added), tok.convert_ids_to_tokens(added))
    if new_token_ids is not None:
        new_token_ids.extend(added)
    missing = check_tokenizer_supports(template, tok)
    if missing:
        raise data_mod.DataError(
            f"data.template: template {template.name} needs special tokens the tokenizer lacks: {missing}; "
            "use a template made for this model (see data_templates/README.md), `template: tokenizer`, or "
            "data.add_template_tokens: true to add and train them")
    problems = data_mod.check_template_tokens(tok, template)
    if problems:
        raise data_mod.DataError("; ".join(problems))
    return source, tok, template


def print_data_summary(report: dict, template_name: str) -> None:
    """One screen, before the first step: what the model will be trained on (see `finetune data`)."""
    from finetune.data_view import format_report

    print(f"template: {template_name}\n" + format_report(report, examples=1), flush=True)


def train(recipe: Recipe, recipe_path: str | Path, resume: bool = False, force: bool = False,
          overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Train under the run lock (one writer per output_dir; main process only), with every torch.load in this
    process forced to weights_only (TORCH_FORCE_WEIGHTS_ONLY_LOAD: covers loads we did not write ourselves)."""
    from finetune.lock import RunLock

    run = Path(recipe.output_dir)
    check_run_dir(run, resume)
    main = rundir.is_main_process()
    if main:  # the other ranks (on other machines, maybe) never write the run directory, nor create it
        run.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run).acquire() if main else None
    env = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        return _train(recipe, recipe_path, resume, force, list(overrides), lock)
    finally:
        for k, v in env.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        if lock is not None:
            lock.release()


def _train(recipe: Recipe, recipe_path: str | Path, resume: bool, force: bool, overrides: list[str], lock) -> Path:
    """The recipe, step by step: each step is one function below, in this order."""
    r = setup(recipe, recipe_path, resume, force, overrides, lock)
    prepared = prepare_data(r)
    model = build_model(r, prepared)
    trainer = build_trainer(r, prepared, model)
    run_trainer(r, trainer, model)
    save_adapter(r, trainer, model)
    return r.run


@dataclass
class Session:
    """What the steps of one training run share: decided in setup, read by the steps after it."""

    recipe: Recipe
    recipe_path: str | Path
    overrides: list[str]
    run: Path
    main: bool
    command: str
    lock: object
    resume: object = None
    hw: object = None
    precision: object = None
    checkpointing: bool = False
    checkpointing_why: str = ""
    source: object = None
    tok: object = None
    template: object = None
    new_token_ids: list = field(default_factory=list)
    """Ids of the tokens data.add_tokens / add_template_tokens added: their embedding rows train."""
    shards: object = None
    shape: StepShape | None = None
    started: float = field(default_factory=time.time)


def setup(recipe: Recipe, recipe_path, resume: bool, force: bool, overrides: list[str], lock) -> Session:
    """Logging, the lock report, the resume decision, hardware and precision, checkpointing, the tokenizer."""
    run = Path(recipe.output_dir)
    r = Session(recipe, recipe_path, overrides, run, rundir.is_main_process(), resume_command(recipe_path, overrides),
                lock)
    rundir.setup_logging(run)
    if lock is not None and lock.stale:
        gone = "gone" if lock.stale.get("alive") is False else "not running here"
        log.warning("recovered a stale lock left by pid %s (%s)", lock.stale.get("pid"), gone)
        _event(run, "stale_lock_recovered", pid=lock.stale.get("pid"), host=lock.stale.get("host"),
               since=lock.stale.get("started"))
    # Before any model loads: refuse a changed recipe/data, clean partial saves, pick the checkpoint.
    if r.main:
        r.resume = resume_mod.plan(run, recipe_to_yaml(recipe), data_mod.data_hashes(recipe), resume, force)
    else:
        latest = ck.latest_complete(run / "checkpoints") if resume else None
        r.resume = resume_mod.ResumePlan(latest, ck.step_of(latest) if latest else 0)
    resume_mod.check_world_size(r.resume.checkpoint, distributed.world_size())  # every rank: none may go on alone
    r.hw = detect_hardware(recipe.train.device)
    if quantized_base(recipe) and not r.hw.cuda:  # a CPU bitsandbytes cannot run: one line, before any work
        check_bnb_runs_on_this_cpu()
    r.precision = choose_precision(recipe, r.hw)
    for w in r.precision.warnings:
        log.warning(w)
    from finetune.plan import checkpointing_for_run

    r.checkpointing, r.checkpointing_why = checkpointing_for_run(recipe, r.hw)
    log.info("gradient checkpointing %s", r.checkpointing_why)
    distributed.check_sharding_hardware(r.hw.cuda)
    problems = distributed.sharding_problems(recipe)
    if problems:
        from finetune.recipe import RecipeError

        raise RecipeError([f"{recipe_path}: {p}" for p in problems])
    problem = lora_hardware_problem(recipe, r.hw)
    if problem:
        raise LoraHardwareError(problem)
    r.source, r.tok, r.template = load_tokenizer_and_template(recipe, r.new_token_ids)
    return r


def prepare_data(r: Session):
    """Rows -> encoded examples; on the main process the run directory gets the resolved recipe, the data report,
    the held-out rows and the manifest, and the reader gets the data summary."""
    recipe, run = r.recipe, r.run
    prepared = data_mod.prepare_for(recipe, r.tok, r.template)
    r.shape = data_mod.shape_for_method(recipe, prepared.train, r.precision.attn_implementation)
    prepared.report["steps"] = r.shape.to_dict()
    if not r.main:
        return prepared
    rundir.write_text(run / "resolved.yaml", recipe_to_yaml(recipe))
    rundir.write_json(run / "data_report.json", prepared.report)
    data_mod.write_held_out_for(recipe, run / "held_out.jsonl", prepared.held_out)
    p = r.precision
    rundir.update_manifest(
        run,
        recipe_file=str(r.recipe_path),
        recipe_sha256=rundir.sha256_text(Path(r.recipe_path).read_text(encoding="utf-8")),
        resolved_sha256=rundir.sha256_text(recipe_to_yaml(recipe)),
        data_sha256=data_mod.data_hashes(recipe),
        base={"spec": r.source.spec, "hf_path": r.source.hf_path, "gguf_file": r.source.gguf_file},
        template=r.template.name,
        method=recipe.train.method,
        start_adapter=start_adapter_record(recipe),
        device=r.hw.name,
        precision={"compute_dtype": p.dtype_name, "bf16": p.bf16, "fp16": p.fp16, "optimizer": p.optimizer,
                   "attn_implementation": p.attn_implementation, "packed_attention": packed_attention(r),
                   "gradient_checkpointing": r.checkpointing,
                   "gradient_checkpointing_why": r.checkpointing_why},
        warnings=list(p.warnings),
        versions=rundir.versions(),
        git_commit=rundir.git_commit(),
        started=rundir.now(),
    )
    print_data_summary(prepared.report, r.template.name)
    resume_mod.trim_log(run / "train_log.jsonl", r.resume.step)
    if r.resume.checkpoint is not None:
        extra = {"forced_despite": r.resume.changes} if r.resume.changes else {}
        _event(run, "resumed", checkpoint=r.resume.checkpoint.name, step=r.resume.step, **extra)
        log.info("resuming from %s (step %d)", r.resume.checkpoint, r.resume.step)
    return prepared


def packed_attention(r: Session) -> str | None:
    """How attention stays inside each example of a packed row: per_example (finetune/attention.py, with
    model.attn_implementation auto and sdpa available) or the kernel's own (block_mask: transformers' mask for sdpa
    and eager, varlen for flash-attention-2). None when the run does not pack."""
    if r.shape is None or not r.shape.packed:
        return None
    auto = r.recipe.model.attn_implementation == "auto" and r.precision.attn_implementation == "sdpa"
    return "per_example" if auto else "block_mask"


def build_model(r: Session, prepared=None):
    """The 4-bit base (tokenizer-aligned, no KV cache) with LoRA attached, seeded like the run it resumes."""
    model = load_base(r.recipe, r.source, r.precision, r.hw)
    resize_for_tokenizer(model, r.tok)
    for fix in align_special_ids(r.tok, model):
        log.warning(fix)
        if r.main:
            rundir.add_event(r.run, "tokenizer_fix", detail=fix)
    model.config.use_cache = False  # the KV cache is useless in training and breaks packed attention masks
    if packed_attention(r) == "per_example":
        model.set_attn_implementation(attention.register())  # each example's own attention, not the whole row's
    # LoRA init draws from the global RNG before the Trainer seeds it: seed here, or two runs of one recipe
    # (and a run and its resume's original) start from different adapters.
    from transformers import set_seed

    set_seed(r.recipe.train.seed)
    if r.recipe.model.adapter:  # continue from an existing adapter (SFT -> DPO), trainable
        model = load_start_adapter(model, r.recipe, r.checkpointing)
    else:
        eva = _eva_batches(r, prepared) if r.recipe.lora.init == "eva" else None
        model = attach_lora(model, r.recipe, r.checkpointing, r.new_token_ids, eva)
    model.peft_config["default"].base_model_name_or_path = r.source.hf_path
    if not r.hw.cuda:  # torch's CPU dropout mask costs ~10% of a step; a GPU's fused kernel does not (dropout.py)
        swapped = dropout.use_lane_dropout(model)
        if swapped:
            log.info("LoRA dropout: %d layers draw their masks as 16-bit lanes (finetune/dropout.py)", swapped)
    if r.recipe.lora.init in CONVERTED_INITS and r.main:
        # PiSSA/OLoRA rewrote the base as a residual: keep the initial adapter, so that save_adapter can convert
        # the trained one (peft's path_initial_model_for_weight_conversion) into plain LoRA on the original base.
        model.save_pretrained(r.run / INITIAL_ADAPTER, selected_adapters=["default"])
    return model


CONVERTED_INITS = ("pissa", "olora")
INITIAL_ADAPTER = "initial_adapter"


def _eva_batches(r: Session, prepared) -> list[dict]:
    """lora.eva_batches padded batches of the training examples for peft's EVA. It decomposes the layer inputs at
    supervised positions only (labels != -100), so each batch takes at least micro_batch_size examples and as many
    more as it needs to hold eva_min_tokens supervised tokens (peft skips a smaller batch, and with no other loops
    forever: short replies, 4 to a micro-batch, did that on the tiny test model)."""
    import torch

    size, need = r.recipe.train.micro_batch_size, eva_min_tokens(r.recipe.lora)
    chunks, chunk, supervised = [], [], 0
    for row in prepared.train:
        chunk.append(row)
        supervised += sum(1 for y in row["labels"] if y != -100)
        if len(chunk) >= size and supervised >= need:
            chunks.append(chunk)
            chunk, supervised = [], 0
            if len(chunks) == r.recipe.lora.eva_batches:
                break
    if not chunks:
        raise EvaError(f"lora.init: eva: an EVA batch needs at least {need} supervised tokens (round(lora.r x "
                       f"lora.eva_rho), the components peft computes per layer) and the whole training set has "
                       f"{supervised}; lower lora.r or lora.eva_rho, or use lora.init: default")
    batches = []
    for chunk in chunks:
        n = max(len(x["input_ids"]) for x in chunk)
        ids = [x["input_ids"] + [r.tok.pad_token_id] * (n - len(x["input_ids"])) for x in chunk]
        labels = [x["labels"] + [-100] * (n - len(x["labels"])) for x in chunk]
        mask = [[1] * len(x["input_ids"]) + [0] * (n - len(x["input_ids"])) for x in chunk]
        batches.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                        "labels": torch.tensor(labels)})
    return batches


def build_trainer(r: Session, prepared, model):
    """TRL's SFTTrainer with our guard (atomic checkpoints, NaN policy), the JSONL log and held-out eval."""
    from finetune.guard import GuardedSFTTrainer

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(r.run / "tensorboard")  # per run, even when one process trains twice
    if data_mod.is_preference(r.recipe):  # dpo, orpo, kto, simpo: TRL's preference trainers, same guard
        from finetune.preference import build_preference_trainer

        trainer = build_preference_trainer(r, prepared, model, JsonlLogCallback(r.run / "train_log.jsonl"))
        keep_adapter_fp32(trainer.model)  # TRL's preference trainers cast QLoRA adapters to bf16 too
        return trainer
    held_ds = None
    if prepared.held_out:
        data = r.recipe.data.model_copy(update={"too_long": "truncate"})
        held_ds = data_mod.to_dataset(data_mod.encode_all(prepared.held_out, r.tok, r.template, data)[0])
    args = sft_config(r.recipe, r.precision, r.hw, r.run, held_ds is not None, r.shape, r.checkpointing)
    train_ds = pack(prepared.train, r.shape) if r.shape.packed else prepared.train
    trainer = GuardedSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=held_ds,
                                processing_class=r.tok, callbacks=[JsonlLogCallback(r.run / "train_log.jsonl")],
                                on_nan=r.recipe.train.on_nan, resume_command=r.command)
    if not distributed.sharded() or r.precision.dtype_name == "float32":
        # FSDP/ZeRO-3 with 16-bit storage keep TRL's bf16 adapters (one dtype per flattened unit); with fp32
        # storage (CPU ranks) bf16 adapters would only lose precision.
        keep_adapter_fp32(trainer.model)
    if not distributed.sharded():  # the loss in token chunks where TRL's fused head has no Triton (finetune/loss.py)
        from finetune.loss import install as chunked_loss

        chunked_loss(trainer.model)
    return trainer


def run_trainer(r: Session, trainer, model) -> None:
    """Train (or publish a finished checkpoint's adapter); a NaN stop or a signal becomes a one-line outcome."""
    from finetune.errors import NonFiniteError
    from finetune.signals import StopOnSignal

    plan, total = r.resume, r.recipe.train.max_steps or r.resume.max_steps
    r.shards = distributed.ShardRecorder(trainer) if distributed.world_size() > 1 else None
    r.started = time.time()
    try:
        if plan.checkpoint is not None and total and plan.step >= total:
            # The run had finished (killed before adapter/ was written). The Trainer, resumed at its last step,
            # would train one step more: publish the final checkpoint's adapter instead.
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(plan.checkpoint / "adapter_model.safetensors"))
            trainer.state.global_step = plan.step
            log.info("%s is the final step of this run; writing its adapter", plan.checkpoint.name)
        else:
            with StopOnSignal(trainer, on_abort=r.lock.release if r.lock is not None else None):
                trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    except NonFiniteError as e:
        last = ck.latest_complete(r.run / "checkpoints")
        if r.main:
            _event(r.run, "stopped_non_finite", step=e.step, detail=str(e), last_good_checkpoint=last and last.name)
        raise NonFiniteError(
            f"{e}. The last good checkpoint is {last or 'none (none was written yet)'}; lower train.learning_rate "
            f"or check the data near that step, or set train.on_nan: skip_step. Resume with: {r.command}",
            step=e.step) from None
    finally:
        if r.main and trainer.skipped_steps:
            _event(r.run, "skipped_non_finite_steps", count=len(trainer.skipped_steps), steps=trainer.skipped_steps)
    _stop_if_interrupted(r, trainer)


def _stop_if_interrupted(r: Session, trainer) -> None:
    from finetune.errors import TrainingInterrupted

    state = trainer.state
    if trainer.stop_signal is None or state.global_step >= state.max_steps:
        return
    import signal

    name = signal.Signals(trainer.stop_signal).name
    last = ck.latest_complete(r.run / "checkpoints")
    if r.main:
        _event(r.run, "interrupted", signal=name, step=state.global_step, checkpoint=last and last.name)
    raise TrainingInterrupted(f"{name}: stopped after step {state.global_step} of {state.max_steps}; "
                              f"checkpoint written: {last}. Resume with:\n  {r.command}")


def save_adapter(r: Session, trainer, model) -> None:
    """Gather (every rank), then publish adapter/ atomically with its marker of file hashes (main process)."""
    # Collectives, on every rank: which examples each rank trained on, and (FSDP/ZeRO-3) the full weights
    # gathered from their shards.
    shard_summary = r.shards.summary() if r.shards is not None else None
    full_state = trainer.accelerator.get_state_dict(trainer.model) if distributed.sharded() else None
    if not r.main:
        return
    adapter = r.run / rundir.ADAPTER
    try:
        with rundir.publishing_dir(adapter) as staging:
            # "default" only: a preference run may hold TRL's frozen reference copy ("ref") beside it
            initial = r.run / INITIAL_ADAPTER if r.recipe.lora.init in CONVERTED_INITS else None
            model.save_pretrained(staging, safe_serialization=True, state_dict=full_state, selected_adapters=["default"],
                                  path_initial_model_for_weight_conversion=str(initial) if initial else None)
            r.tok.chat_template = r.template.source  # one template from training to every export
            r.tok.save_pretrained(staging)
            # The marker (sizes + sha256 of every file) lets merge/eval/export name a damaged file in one line.
            rundir.write_json(staging / rundir.MARKER, rundir.adapter_marker_body(staging))
    except OSError as e:
        last = ck.latest_complete(r.run / "checkpoints")
        raise ck.CheckpointError(f"could not write {adapter}: {e.strerror or e}; training itself is complete in "
                                 f"{last}. Free disk space, then this writes the adapter: {r.command}") from None
    rundir.update_manifest(r.run, finished=rundir.now(), train_seconds=round(time.time() - r.started, 1),
                           global_step=trainer.state.global_step)
    if shard_summary:
        rundir.update_manifest(r.run, distributed=shard_summary)
    write_report(r.run)
    log.info("adapter written to %s", adapter)
