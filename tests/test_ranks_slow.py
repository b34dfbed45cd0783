"""Several ranks on one CPU (issue 17): FSDP2 over 4-bit layers with torch alone, two "machines" on loopback, and
kill -9 / SIGTERM / resume across the ranks of a 2-rank DDP run. Minutes of multi-process work: marked slow.

FSDP and ZeRO-3 through `finetune train` are refused on CPU ranks (Accelerate would silently train DDP there; see
finetune/distributed.py check_sharding_hardware), so the FSDP test drives torch's fully_shard directly
(tests/fsdp2_cpu.py) to show that torch + bitsandbytes do shard NF4 weights on CPU ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_recipe
from per_rank import assert_per_rank, plan_with_config
from finetune import checkpoints as ck

pytestmark = pytest.mark.slow

ROWS = [{"instruction": f"what is item {i}", "input": "", "output": f"answer {i}"} for i in range(32)]
TRAIN = {"max_steps": 8, "micro_batch_size": 4, "grad_accum": 1, "save_steps": 2, "learning_rate": 5e-3,
         "report_to": ["none"], "gradient_checkpointing": False, "logging_steps": 1}
# Each rank sleeps a little at every step end, so that a kill after checkpoint-2 lands before the run ends.
SLOW_STEPS = ("import os\nif os.environ.get('RANK') is not None:\n"
              "    from transformers import trainer_callback as _tc; import time as _t\n"
              "    _f = _tc.DefaultFlowCallback.on_step_end\n"
              "    _tc.DefaultFlowCallback.on_step_end = lambda self, *a, **k: (_t.sleep(0.5), _f(self, *a, **k))[1]\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate(*args) -> list[str]:
    exe = shutil.which("accelerate")
    return [exe, "launch", *map(str, args)] if exe else [sys.executable, "-m", "accelerate.commands.launch", *map(str, args)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    slow = tmp_path_factory.mktemp("slow-steps")
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    base = dict(os.environ, FINETUNE_CACHE=str(tmp_path_factory.getbasetemp() / "finetune-cache"),
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return {"plain": base, "slow": {**base, "PYTHONPATH": os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")])}}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_model_dir, env):
    """The recipe (LoRA dropout on: RNG states matter), its launch command and an uninterrupted 2-rank run."""
    tmp = tmp_path_factory.mktemp("ranks")
    recipe = make_recipe(tmp, tiny_model_dir, rows=ROWS, data={"packing": False}, train=TRAIN,
                         lora={"r": 8, "alpha": 16, "dropout": 0.1})
    port = free_port()

    def command(out: Path, *extra):
        return accelerate("--num_processes", 2, "--cpu", "--main_process_port", port, "-m", "finetune", "train",
                          recipe, f"output_dir={out}", *extra)

    proc = subprocess.run(command(tmp / "A"), env=env["plain"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "recipe": recipe, "command": command, "A": tmp / "A"}


def rank_processes(launcher: subprocess.Popen):
    import psutil

    out = []
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "RANK" in p.environ() and "finetune" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if step in [ck.step_of(p) for p in ck.list_complete(run / "checkpoints")]:
            return
        assert proc.poll() is None, f"training ended before checkpoint-{step}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint-{step} after {timeout} s:\n{log.read_text()[-3000:]}")


def logged_steps(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = (load_file(x / "adapter" / "adapter_model.safetensors") for x in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs from the uninterrupted 2-rank run"


def resume(ddp, out: Path, env) -> None:
    proc = subprocess.run(ddp["command"](out, "--resume"), env=env["plain"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kill9_both_ranks_then_resume_equals_uninterrupted(ddp, env):
    b, log = ddp["tmp"] / "B", ddp["tmp"] / "b.log"
    proc = subprocess.Popen(ddp["command"](b), env=env["slow"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_checkpoint(b, 2, proc, log)
    ranks = rank_processes(proc)
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    for p in ranks:
        p.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)  # the launchers too, as a dead machine would leave them
    proc.wait(timeout=60)
    done = [ck.step_of(p) for p in ck.list_complete(b / "checkpoints")]
    assert 2 <= max(done) < TRAIN["max_steps"], done
    assert not (b / "adapter").exists()
    resume(ddp, b, env)
    steps = logged_steps(b)
    assert sorted(steps) == list(range(1, TRAIN["max_steps"] + 1))
    assert steps == logged_steps(ddp["A"])
    assert_same_adapter(ddp["A"], b)


def test_sigterm_to_one_rank_stops_all_at_one_step_then_resumes(ddp, env):
    c, log = ddp["tmp"] / "C", ddp["tmp"] / "c.log"
    proc = subprocess.Popen(ddp["command"](c), env=env["slow"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_checkpoint(c, 2, proc, log)
    ranks = sorted(rank_processes(proc), key=lambda p: int(p.environ()["RANK"]))
    ranks[1].send_signal(signal.SIGTERM)  # not the main rank: the stop must still reach every rank
    proc.wait(timeout=300)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    stopped = [ck.step_of(p) for p in ck.list_complete(c / "checkpoints")]
    last = max(stopped)
    assert 2 < last < TRAIN["max_steps"] and max(logged_steps(c)) == last, (stopped, logged_steps(c))
    assert f"SIGTERM: stopped after step {last} of" in out
    events = [e for e in json.loads((c / "manifest.json").read_text())["events"] if e["kind"] == "interrupted"]
    assert len(events) == 1 and events[0]["step"] == last
    assert not list((c / "checkpoints").glob(".tmp-*"))

    # Another number of processes is refused, in one line, before any model loads.
    one = subprocess.run([sys.executable, "-m", "finetune", "train", ddp["recipe"], f"output_dir={c}", "--resume"],
                         env=env["plain"], capture_output=True, text=True, timeout=300)
    errors = [x for x in (one.stdout + one.stderr).splitlines() if x.startswith("error: ")]
    assert one.returncode == 2 and len(errors) == 1, one.stderr[-2000:]
    assert f"refusing to resume checkpoint-{last} with 1 process: it was written by 2" in errors[0]

    resume(ddp, c, env)
    assert logged_steps(c) == logged_steps(ddp["A"])
    assert_same_adapter(ddp["A"], c)


def test_two_machines_on_loopback(ddp, env):
    """The README's multi-machine command, verbatim but on 127.0.0.1: two launchers, one rank each. Machine 1 is given
    another output_dir: had it written anything, it would be there."""
    d, elsewhere = ddp["tmp"] / "D", ddp["tmp"] / "machine1-out"
    port = free_port()
    procs = [subprocess.Popen(
        accelerate("--config_file", REPO / "recipes" / "accelerate" / "ddp.yaml", "--num_machines", 2,
                   "--num_processes", 2, "--machine_rank", m, "--main_process_ip", "127.0.0.1",
                   "--main_process_port", port, "-m", "finetune", "train", ddp["recipe"],
                   f"output_dir={d if m == 0 else elsewhere}"),
        env=env["plain"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for m in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "done: " in outs[0] and "done: " not in outs[1]
    assert not elsewhere.exists()
    dist = json.loads((d / "manifest.json").read_text())["distributed"]
    assert (dist["world_size"], dist["backend"]) == (2, "gloo")
    # 8 steps x 4 x 2 ranks = two epochs of 32 rows: each rank 16 distinct rows an epoch, reshuffled in between
    assert dist["examples_per_rank"] == [32, 32] and dist["rank_fingerprints"][0] != dist["rank_fingerprints"][1]
    assert dist["parameter_bytes_per_rank"][0] == dist["parameter_bytes_per_rank"][1] > 0  # DDP: full copies
    assert sorted(logged_steps(d)) == list(range(1, TRAIN["max_steps"] + 1))
    rng = sorted(p.name for p in (d / "checkpoints" / "checkpoint-8").glob("rng_state*"))
    assert rng == ["rng_state_0.pth", "rng_state_1.pth"]  # machine 1's RNG state, written by machine 0


def two_cpu_ranks(script: str, tiny_model_dir: Path, out: Path, env: dict) -> list[dict]:
    """torchrun tests/SCRIPT on 2 CPU ranks over the tiny model; what each rank wrote to OUT/rank<N>.json."""
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(REPO / "tests" / script),
                           str(tiny_model_dir), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


@pytest.fixture(scope="module")
def fsdp2(tiny_model_dir, tmp_path_factory, env):
    out = tmp_path_factory.mktemp("fsdp2")
    return out, two_cpu_ranks("fsdp2_cpu.py", tiny_model_dir, out, env["plain"])


def test_fsdp2_shards_4bit_weights_on_cpu_ranks(fsdp2):
    tmp_path, ranks = fsdp2
    for r in ranks:
        assert r["before"]["four_bit"] > 0
        assert r["after"]["four_bit"] == r["before"]["four_bit"] // 2  # each rank: half of the NF4 weights
        assert abs(r["after"]["total"] - r["before"]["total"] / 2) <= 0.01 * r["before"]["total"]
        assert r["loss_sharded"] == pytest.approx(r["loss_unsharded"], rel=1e-6, abs=1e-6)
        assert r["lora_grads"] > 0
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights and not any("module." in k or "_fsdp" in k or "_orig_mod" in k for k in weights)
    assert {tuple(v.shape) for k, v in weights.items() if "q_proj.lora_A" in k} == {(8, 64)}  # full, not shards


def _sharded_recipe(tmp: Path, tiny_model_dir: Path) -> Path:
    """The tiny recipe as tests/fsdp2_cpu.py and tests/zero3_cpu.py load it: NF4 with double quant, stored and
    computed in float32 (quant_storage must equal compute_dtype to shard), LoRA r=8 on every linear layer."""
    return make_recipe(tmp, tiny_model_dir, quantization={"compute_dtype": "float32", "quant_storage": "float32"})


@pytest.mark.parametrize("config", ["fsdp_qlora.yaml", "fsdp_qlora_offload.yaml"])
def test_plan_per_rank_matches_fsdp2_ranks(fsdp2, config, tiny_model_dir, tmp_path):
    """`finetune plan --accelerate-config` for the FSDP configs against what each FSDP2 rank held: half of every
    parameter, and the whole quantisation constants. Exact here; in general a rank may hold up to one dim-0 row per
    parameter more or less than total/2 (FSDP2 chunks dim 0, the first rank takes ceil(rows/2) and the padding is
    not part of its local shard): uneven_row_bytes, 0 for the tiny model, whose dims are all even. With
    fsdp_offload_params the same bytes are the plan's CPU RAM per process and none are on the device (on these CPU
    ranks, where the shards live does not change what they are)."""
    _, ranks = fsdp2
    plan = plan_with_config(_sharded_recipe(tmp_path, tiny_model_dir), config)
    assert plan["setup"]["num_processes"] == 2 and plan["held_per_rank"]["offloaded"] == config.endswith("offload.yaml")
    for r in ranks:
        after = r["after"]
        assert_per_rank(plan, after["total"], after["four_bit"], r["quant_state_after"], r["uneven_row_bytes"])


def test_plan_per_rank_matches_zero3_ranks(tiny_model_dir, tmp_path, env):
    """The same for recipes/accelerate/zero3_qlora.yaml against DeepSpeed ZeRO-3 on 2 CPU ranks (tests/zero3_cpu.py;
    Accelerate refuses DeepSpeed on CPU ranks, DeepSpeed alone runs there). ZeRO-3 pads each parameter to a multiple
    of the ranks: a rank may differ from total/2 by one element per parameter with an odd count (0 here)."""
    pytest.importorskip("deepspeed", reason="pip install deepspeed to measure ZeRO-3 on CPU ranks (tests/test_ranks.py "
                                            "checks the plan against a computation without it)")
    ranks = two_cpu_ranks("zero3_cpu.py", tiny_model_dir, tmp_path, env["plain"])
    plan = plan_with_config(_sharded_recipe(tmp_path, tiny_model_dir), "zero3_qlora.yaml")
    assert (plan["setup"]["num_processes"], plan["setup"]["sharding"]) == (2, "zero3")
    for r in ranks:
        assert r["after"]["total"] < r["before"]["total"]  # partitioned, not a silent replica
        assert r["loss_sharded"] == pytest.approx(r["loss_unsharded"], rel=1e-6, abs=1e-6)
        assert_per_rank(plan, r["after"]["total"], r["after"]["four_bit"], r["quant_state_after"],
                        r["uneven_element_bytes"])
