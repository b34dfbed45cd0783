"""Preference tuning (train.method dpo | orpo | kto | simpo): the recipe mapped onto TRL's configs and trainers.

TRL does the work: `DPOTrainer` (dpo), `KTOTrainer` (kto), and the experimental `ORPOTrainer` (orpo) and
`CPOTrainer` with loss_type="simpo", cpo_alpha=0 (simpo, as TRL expresses SimPO). Each gets the guard of SFT runs
(guard.GuardMixin: atomic checkpoints, SIGTERM, NaN policy), the same precision flags, and our already tokenised
columns (data/preference.py), so TRL tokenises nothing and renders no template of its own.

The reference model of dpo/kto is never a second copy of the base: with a PEFT model and no ref_model, TRL adds
a frozen copy of the starting adapter ("ref") and computes reference log-probs through it, on the same 4-bit
base (reference: start). reference: base deletes that copy, so TRL disables the adapters instead.
"""

from __future__ import annotations

import logging
import math
import os

from trl import DPOTrainer, KTOTrainer

from finetune.data.preference import encode_all_preference, max_prompt_length, to_dataset
from finetune import distributed
from finetune.guard import GuardMixin

log = logging.getLogger("finetune")


def training_kwargs(recipe, precision, hw, run, has_eval: bool, n_train: int, gradient_checkpointing: bool) -> dict:
    """The TrainingArguments every method shares, set like train.sft_config sets them (every precision flag
    explicit: TRL's configs default to bf16=True). Pairs are never packed: a step is micro x accum x world rows."""
    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, math.ceil(n_train / (t.micro_batch_size * t.grad_accum * world)))
    total = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    return dict(
        output_dir=str(run / "checkpoints"), num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.micro_batch_size, per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        optim=precision.optimizer, seed=t.seed, data_seed=t.seed, bf16=precision.bf16, fp16=precision.fp16,
        use_cpu=not hw.cuda, gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=t.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or max(1, total // 5)) if has_eval else None,
        report_to=[r for r in t.report_to if r != "none"] or "none", dataloader_num_workers=0,
        remove_unused_columns=True, disable_tqdm=False, ddp_find_unused_parameters=False if world > 1 else None,
        max_length=recipe.data.max_length)


def method_config(recipe, common: dict):
    """(config, trainer class) for train.method; unset preference keys keep TRL's defaults."""
    pref = recipe.preference
    set_ = {k: getattr(pref, k) for k in (pref.model_fields_set if pref else ()) if getattr(pref, k) is not None}
    reference = set_.pop("reference", "start")
    set_.pop("max_prompt_length", None)  # applied by data/preference.py when encoding
    method = recipe.train.method
    if method in ("dpo", "kto"):
        set_["precompute_ref_log_probs"] = reference == "precomputed"
    if method == "dpo":
        from trl import DPOConfig

        if isinstance(set_.get("loss_type"), str):
            set_["loss_type"] = [set_["loss_type"]]
        return DPOConfig(**common, **set_), GuardedDPOTrainer
    if method == "kto":
        from trl import KTOConfig

        return KTOConfig(**common, **set_), GuardedKTOTrainer
    _quiet_experimental()
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**common, **set_), guarded_orpo()
    from trl.experimental.cpo import CPOConfig

    return CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, **set_), guarded_simpo()


def build_preference_trainer(r, prepared, model, log_callback):
    """The method's TRL trainer, guarded, on our tokenised pairs (held-out pairs as its eval set)."""
    held_ds = None
    if prepared.held_out:
        data = r.recipe.data.model_copy(update={"too_long": "truncate"})
        rows, _ = encode_all_preference(prepared.held_out, r.tok, r.template, data, max_prompt_length(r.recipe))
        held_ds = to_dataset(rows)
    common = training_kwargs(r.recipe, r.precision, r.hw, r.run, held_ds is not None, len(prepared.train),
                             r.checkpointing)
    args, cls = method_config(r.recipe, common)
    # TRL casts the trainable adapter of a quantized model to bf16 in place (after copying it as the reference):
    # restoring only the dtype afterwards would keep the rounding, so a starting adapter would no longer equal its
    # own reference. Keep the exact fp32 values instead (the dtype policy of train.keep_adapter_fp32).
    exact = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = cls(model=model, args=args, train_dataset=prepared.train, eval_dataset=held_ds,
                  processing_class=r.tok, callbacks=[log_callback], on_nan=r.recipe.train.on_nan,
                  resume_command=r.command)
    for name, param in model.named_parameters():
        if name in exact and not distributed.sharded():
            param.data = exact[name]
    pref = r.recipe.preference
    if pref is not None and pref.reference == "base" and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # TRL then computes the reference with every adapter disabled
    return trainer


# ---------------------------------------------------------------------------------------------
# The trainers. Each takes our columns as they are; the override names what TRL would otherwise do.


class GuardedDPOTrainer(GuardMixin, DPOTrainer):
    """DPOTrainer on prompt_ids / chosen_ids / rejected_ids we encoded with the run's template."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL's version extracts the prompt, appends EOS to replies and tokenises; ours is already done (the
        # template's own end token, supervised; prompts and replies cut by data/preference.py's stated rule).
        return dataset


class GuardedKTOTrainer(GuardMixin, KTOTrainer):
    """KTOTrainer on prompt_ids / completion_ids / label we encoded with the run's template."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Tokenising is done; what remains of TRL's version is its KL pairing: completions rotated by one within
        # each batch of per_device_train_batch_size, (x_i, y_{i-1}) (trl/trainer/kto_trainer.py, internals.py).
        if self.calculate_KL:
            def add_kl_completion_ids(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            dataset = dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def _cpo_row(self, feature, model=None) -> dict:
    """tokenize_row of TRL's CPO/ORPO trainers, from our ids: the same keys, labels -100 on the prompt."""
    prompt = list(feature["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [-100] * len(prompt) + list(feature[f"{side}_ids"])
    return out


def _quiet_experimental() -> None:
    # ORPO and CPO live in trl.experimental (TRL 1.16); the recipe names them, so the import warning is noise.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def guarded_orpo():
    _quiet_experimental()
    from trl.experimental.orpo import ORPOTrainer

    return type("GuardedORPOTrainer", (GuardMixin, ORPOTrainer), {"tokenize_row": _cpo_row})


def guarded_simpo():
    _quiet_experimental()
    from trl.experimental.cpo import CPOTrainer

    return type("GuardedSimPOTrainer", (GuardMixin, CPOTrainer), {"tokenize_row": _cpo_row})
