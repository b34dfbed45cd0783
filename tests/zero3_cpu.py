"""torchrun --nproc_per_node 2 tests/zero3_cpu.py MODEL_DIR OUT_DIR: DeepSpeed ZeRO-3 over the 4-bit QLoRA model of
tests/fsdp2_cpu.py on CPU ranks (DeepSpeed's CPU accelerator, gloo), without Accelerate (which refuses DeepSpeed on
CPU ranks: finetune/distributed.py). Needs `pip install deepspeed` (not a dependency of finetune).

Each rank writes OUT_DIR/rank<N>.json: the parameter bytes it holds before and after ZeRO-3 partitions the model,
the bytes of the quantisation constants it holds after, and the loss of one batch unpartitioned and partitioned.
tests/test_ranks_slow.py checks `finetune plan`'s per-rank figure for recipes/accelerate/zero3_qlora.yaml against it.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fsdp2_cpu import qlora, quant_state_bytes  # noqa: E402

from finetune.distributed import held_parameter_bytes  # noqa: E402


def uneven_element_bytes(model, world: int) -> int:
    """How far a rank's partition may be from total/world: ZeRO-3 pads each parameter to a multiple of the ranks."""
    return sum(p.element_size() for p in model.parameters() if p.numel() % world)


def main(model_dir: str, out: Path) -> None:
    deepspeed.init_distributed("gloo")
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 22, 40]])
    model = qlora(model_dir)
    report = {"before": held_parameter_bytes(model), "uneven_element_bytes": uneven_element_bytes(model, 2)}
    report["loss_unsharded"] = float(model(input_ids=ids, labels=ids).loss)  # with grad: the training kernel path
    model = qlora(model_dir)  # a fresh copy: on the CPU the first forward rewrites a double-quantised absmax
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    report["after"] = held_parameter_bytes(engine.module)
    report["quant_state_after"] = quant_state_bytes(engine.module)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    report["loss_sharded"] = float(loss.detach())
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
