"""torchrun --nproc_per_node 2 tests/fsdp2_cpu.py MODEL_DIR OUT_DIR: torch's FSDP2 (`fully_shard`) over a 4-bit QLoRA
model on CPU ranks (gloo), without Accelerate (which will not run FSDP on CPU ranks: see finetune/distributed.py).

Each rank writes OUT_DIR/rank<N>.json: the parameter bytes it holds before and after sharding, the bytes of the 4-bit
quantisation constants it holds after sharding, the loss of one batch before sharding (the single-process reference)
and after; rank 0 also gathers the full state and saves the adapter with PEFT to OUT_DIR/adapter.
tests/test_ranks_slow.py checks the numbers, and `finetune plan`'s per-rank figure against them.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetune.distributed import held_parameter_bytes  # noqa: E402
from finetune.memory import _quant_state_tensors  # noqa: E402


def qlora(model_dir: str):
    """The tiny model in NF4 stored as float32 (FSDP shards floating-point tensors) with non-identity LoRA."""
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32,
                                                device_map={"": "cpu"})
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def quant_state_bytes(model) -> int:
    """Bytes of the 4-bit quantisation constants this process holds (absmax, nested absmax, codes). They are no
    parameters: after sharding each Linear4bit keeps its whole quant_state (bitsandbytes restores the sharded
    weight's from it). Measured before the first forward: on the CPU that forward replaces a double-quantised absmax
    by its bfloat16 dequantisation."""
    seen = {}
    for m in model.modules():
        qs = getattr(m, "quant_state", None) or getattr(getattr(m, "weight", None), "quant_state", None)
        for t in _quant_state_tensors(qs) if qs is not None else []:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def uneven_row_bytes(model, world: int) -> int:
    """How far a rank's sharded bytes may be from total/world: FSDP2 chunks each parameter's dim 0 (the first ranks
    take ceil(rows/world) rows), so each parameter whose rows do not divide by world moves up to one row."""
    return sum(p[0].numel() * p.element_size() for p in model.parameters() if p.dim() and p.shape[0] % world)


def main(model_dir: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 22, 40]])
    reference = qlora(model_dir)  # a second, never sharded copy: the single-process loss
    # (a forward pass before fully_shard breaks the sharded copy's later forward: bitsandbytes' quant-state
    # recovery asserts weight.shape[1] == 1, bitsandbytes/nn/modules.py:498)
    report = {"before": held_parameter_bytes(reference), "uneven_row_bytes": uneven_row_bytes(reference, 2),
              "loss_unsharded": float(reference(input_ids=ids, labels=ids).loss)}
    model = qlora(model_dir)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    report["after"] = held_parameter_bytes(model)
    report["quant_state_after"] = quant_state_bytes(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    report["loss_sharded"] = float(loss.detach())
    report["lora_grads"] = sum(1 for n, p in model.named_parameters() if "lora_" in n and p.grad is not None)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # what accelerate's get_state_dict does for FSDP2, then our save_adapter's save_pretrained
        model.save_pretrained(out / "adapter", state_dict=full, safe_serialization=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
