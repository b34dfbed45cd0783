"""model.adapter: start training from an existing LoRA adapter (an SFT run's adapter/, then DPO on it).

The adapter is loaded trainable onto the same 4-bit base, with the base prepared exactly as for a fresh adapter;
its sha256 goes into the manifest so a run says what it started from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune import distributed, rundir
from finetune.errors import UserError


class StartAdapterError(UserError):
    """model.adapter names no usable adapter (or a damaged one)."""


def adapter_dir(spec: str) -> Path:
    """An adapter directory as given, or the adapter/ of a run directory (checked against its marker)."""
    p = Path(spec).expanduser()
    if (p / "adapter_config.json").is_file():
        if p.name == rundir.ADAPTER:
            rundir.check_adapter(p.parent)  # a run's adapter/: every file must match its recorded sha256
        return p
    if (p / rundir.ADAPTER / "adapter_config.json").is_file():
        rundir.check_adapter(p)
        return p / rundir.ADAPTER
    raise StartAdapterError(f"model.adapter: no adapter in {p} (want adapter_config.json there or in {p}/adapter/)")


def adapter_sha256(adapter: Path) -> str:
    """sha256 over the weights and config, as rundir.adapter_sha hashes a run's adapter/."""
    h = hashlib.sha256()
    for name in rundir.ADAPTER_WEIGHTS:
        f = adapter / name
        if not f.is_file():
            raise StartAdapterError(f"model.adapter: {f} is missing")
        h.update(f.read_bytes())
    return h.hexdigest()


def start_adapter_record(recipe) -> dict | None:
    if not recipe.model.adapter:
        return None
    d = adapter_dir(recipe.model.adapter)
    return {"path": str(d.resolve()), "sha256": adapter_sha256(d)}


def load_start_adapter(model, recipe, gradient_checkpointing: bool):
    """The base prepared as models.attach_lora prepares it, then the starting adapter loaded trainable as "default"."""
    from peft import PeftModel, prepare_model_for_kbit_training

    if recipe.quantization.load_in_4bit and not distributed.sharded():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return PeftModel.from_pretrained(model, str(adapter_dir(recipe.model.adapter)), is_trainable=True)
