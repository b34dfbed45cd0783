"""Several processes through Accelerate: who launched us, what sharding means for loading, and proof that the
ranks trained on different data.

Data parallelism itself is Accelerate's (inside the Trainer): each rank reads its own shard of every epoch
through a DistributedSampler, gradients are averaged, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from finetune.errors import UserError

log = logging.getLogger("finetune")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_enabled() -> bool:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP."""
    return _flag("ACCELERATE_USE_FSDP")


def zero3_enabled() -> bool:
    return _flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def sharded() -> bool:
    """FSDP or DeepSpeed ZeRO-3: parameters are split across ranks, so every weight of a wrapped unit must share
    one dtype. For QLoRA that means: 4-bit weights stored in the compute dtype (quantization.quant_storage),
    no fp32 upcast of norms/embeddings, adapters in that dtype too, and no per-rank device_map."""
    return fsdp_enabled() or zero3_enabled()


class ShardingError(UserError):
    """FSDP/ZeRO-3 asked for where they cannot shard anything."""


def check_sharding_hardware(cuda: bool) -> None:
    """FSDP/ZeRO-3 on CPU ranks: Accelerate would silently train plain DDP (every rank a full model copy), because it
    maps CPU ranks to MULTI_CPU and only turns GPU-like types into FSDP (accelerate 1.15, state.py:986-1013) or
    DeepSpeed (state.py:974, `not cpu`). Measured: a 2-rank "FSDP" run on CPU held the whole model on each rank."""
    if sharded() and not cuda:
        kind = "FSDP" if fsdp_enabled() else "DeepSpeed ZeRO-3"
        raise ShardingError(f"{kind} needs GPUs: on CPU ranks Accelerate trains plain DDP (a full model copy per "
                            "rank) and would shard nothing; for CPU ranks use `accelerate launch --num_processes N "
                            "--cpu -m finetune train RECIPE` (DDP on gloo)")


def sharding_problems(recipe) -> list[str]:
    """Recipe settings that cannot work under FSDP/ZeRO-3 (empty when not sharded)."""
    q = recipe.quantization
    if not sharded() or not q.load_in_4bit:
        return []
    if q.quant_storage != q.compute_dtype:
        return [f"quantization.quant_storage: must equal quantization.compute_dtype ({q.compute_dtype}) under "
                f"FSDP/DeepSpeed ZeRO-3 so the 4-bit weights can be sharded (got {q.quant_storage})"]
    return []


# ---------------------------------------------------------------------------------------------
# `accelerate launch --cpu --num_processes N` starts a single process


def requested_cpu_processes() -> int | None:
    """N when we were started by `accelerate launch --cpu --num_processes N` (N > 1) and are not yet one of N ranks.

    Accelerate's simple launcher runs *one* Python process for --cpu; it spawns several CPU ranks only through
    mpirun (huggingface/accelerate#2741). It does set MASTER_ADDR when N > 1, and N is on its own command line.
    """
    env = os.environ
    if not _flag("ACCELERATE_USE_CPU") or "MASTER_ADDR" not in env:
        return None
    if any(k in env for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i for i, a in enumerate(argv) if a == "launch" or a.endswith("accelerate.commands.launch")]
    if not starts:
        return None
    from finetune import internals

    launch_command_parser = internals.get("accelerate.commands.launch.launch_command_parser")
    ns, _ = launch_command_parser().parse_known_args(argv[starts[0] + 1:])
    n = ns.num_processes
    if n is None and ns.config_file:
        import yaml

        n = (yaml.safe_load(Path(ns.config_file).read_text()) or {}).get("num_processes")
    if (ns.num_machines or 1) > 1:
        return None  # several CPU machines: that is mpirun's job (see the README)
    return int(n) if n and int(n) > 1 else None


def relaunch_cpu_ranks(n: int) -> int:
    """Start n ranks of this same command with torch's elastic launcher (what `accelerate launch --multi_gpu`
    uses) on gloo, wait for them, and return their exit code."""
    from finetune import internals

    get_args_parser = internals.get("torch.distributed.run.get_args_parser")
    run = internals.get("torch.distributed.run.run")

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log.info("accelerate launch --cpu started one process; starting %d CPU ranks (DDP on gloo)", n)
    args = get_args_parser().parse_args([
        "--nproc_per_node", str(n), "--master_addr", os.environ["MASTER_ADDR"],
        "--master_port", os.environ.get("MASTER_PORT", "29500"), "-m", "finetune", *sys.argv[1:]])
    try:
        run(args)
    except Exception as e:  # ChildFailedError: the failing rank already printed its own error
        log.error("a rank failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# Which examples each rank trained on


class ShardRecorder:
    """Wraps the trainer's collator to fingerprint every training example a rank collates (only while the model
    is in training mode, so evaluation batches are not counted), then gathers the fingerprints on rank 0."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.inner = trainer.data_collator
        self.seen: list[str] = []
        trainer.data_collator = self

    def __call__(self, features):
        if self.trainer.model.training:
            for f in features:
                ids = f["input_ids"]
                self.seen.append(hashlib.sha1(repr(list(ids)).encode()).hexdigest()[:16])
        return self.inner(features)

    def summary(self) -> dict | None:
        """Per-rank counts and the overlap between ranks, and the parameter bytes each rank holds; a collective
        call (every rank must call it)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.seen)
        held: list = [None] * dist.get_world_size()
        dist.all_gather_object(held, held_parameter_bytes(self.trainer.model_wrapped))
        sets = [set(s) for s in everyone]
        shared = set.intersection(*sets) if sets else set()
        return {"world_size": dist.get_world_size(), "backend": dist.get_backend(),
                "examples_per_rank": [len(s) for s in everyone], "distinct_per_rank": [len(s) for s in sets],
                "examples_seen_by_every_rank": len(shared),
                "rank_fingerprints": [hashlib.sha1("".join(sorted(s)).encode()).hexdigest()[:12] for s in everyone],
                "parameter_bytes_per_rank": [h["total"] for h in held],
                "four_bit_bytes_per_rank": [h["four_bit"] for h in held]}


def held_parameter_bytes(model) -> dict:
    """Bytes of parameter storage this rank holds: all of it, and the packed 4-bit weights' part.

    A DDP rank holds the whole model. FSDP2 (`fully_shard`) turns every parameter into a DTensor whose local
    shard is what this rank stores; FSDP1 flattens each wrapped unit into one FlatParameter that already is the
    local shard (there, which bytes are 4-bit is not known: four_bit is None). ZeRO-3 leaves a placeholder of
    size 0 and keeps the partition in `ds_tensor`.
    """
    total = four_bit = 0
    flat = False
    for name, p in model.named_parameters():
        local = _local(p)
        n = local.numel() * local.element_size()
        total += n
        flat = flat or "_flat_param" in name
        if type(p).__name__ == "Params4bit" or type(local).__name__ == "Params4bit" or _is_4bit(model, name):
            four_bit += n
    return {"total": total, "four_bit": None if flat else four_bit}


def _local(p):
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 partition
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor


def _is_4bit(model, name: str) -> bool:
    """The parameter `name` is the weight of a bitsandbytes Linear4bit (its class survives sharding)."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return attr == "weight" and type(module).__name__ == "Linear4bit"
