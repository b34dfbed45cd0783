"""What a loaded model, an optimizer and one training step really take: the measurements `finetune plan`'s
estimate is checked against (tests/test_plan.py, bench/memory.py)."""

from __future__ import annotations

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quant_state_tensors(qs) -> list:
    out = []
    for v in vars(qs).values():
        if hasattr(v, "untyped_storage"):
            out.append(v)
        elif v.__class__.__name__ == "QuantState":
            out += _quant_state_tensors(v)
    return out


def model_bytes(model) -> dict[str, int]:
    """Bytes held by a model, each storage counted once: base (4-bit data + quantisation state, or frozen
    16/32-bit linears), kept (other frozen parameters), lora (trainable), buffers."""
    seen: set[int] = set()
    out = {"base": 0, "kept": 0, "lora": 0, "buffers": 0}

    def add(key, t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            out[key] += st.nbytes()

    for name, p in model.named_parameters():
        qs = getattr(p, "quant_state", None)
        if p.requires_grad:
            add("lora", p)
        elif qs is not None:
            add("base", p)
            for t in _quant_state_tensors(qs):
                add("base", t)
        elif any(f".{n}." in f".{name}" for n in LINEAR_NAMES):
            add("base", p)
        else:
            add("kept", p)
    for b in model.buffers():
        add("buffers", b)
    return out


def optimizer_bytes(optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (shared tensors counted once)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for v in state.values():
            if hasattr(v, "untyped_storage") and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


def step_peak_bytes(model, batch: int, seq: int, optimizer=None, fused: bool = False) -> int:
    """Peak bytes allocated above the starting point during one forward/backward/AdamW step on the CPU, from the
    profiler's allocation events (the CPU analogue of torch.cuda.max_memory_allocated). The logits are dropped
    before backward, as Trainer.training_step does. fused: the loss as TRL's SFTTrainer computes it,
    model(..., fused_lm_head=True) (the model patched by trl's add_fused_lm_head, and finetune.loss.install)."""
    import torch

    ids = torch.randint(5, model.config.vocab_size, (batch, seq))
    opt = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids, **({"fused_lm_head": True} if fused else {})).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return profiled_peak(step)


def profiled_peak(step) -> int:
    """Peak CPU bytes allocated above the starting point while `step()` runs a second time (the first run creates
    the optimizer state, so the measured one only adds activations and gradients), from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type().name == "CPU"), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak
