"""Preference tuning (issue 13): the recipe keys, the three data formats, DPO/ORPO/KTO/SimPO on the tiny 4-bit
model, a starting adapter, merge and resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_recipe
from safetensors.torch import load_file
from tiny import write_jsonl
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe import RecipeError, load_recipe

COLORS = ("red", "green", "blue")
NUMS = ("one", "two", "three", "four", "five", "six", "seven")


def pair_rows(n: int = 24) -> list[dict]:
    """The chosen reply says yes + the colour; the rejected one says no + a number."""
    return [{"prompt": f"what is {COLORS[i % 3]} {NUMS[i % 7]} {i}", "chosen": f"yes {COLORS[i % 3]}",
             "rejected": f"no {NUMS[(i * 3) % 7]}"} for i in range(n)]


def messages_rows(n: int = 24) -> list[dict]:
    return [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
            for r in pair_rows(n)]


def kto_rows(n: int = 24) -> list[dict]:
    out = []
    for r in pair_rows(n // 2):
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


PREF_TRAIN = {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3, "save_steps": 1000,
              "report_to": ["none"], "gradient_checkpointing": False, "logging_steps": 1, "method": "dpo"}


def pref_recipe(tmp_path: Path, model_dir: Path, rows=None, fmt: str = "preference", method: str = "dpo",
                **sections) -> Path:
    rows = rows if rows is not None else {"preference": pair_rows, "preference_messages": messages_rows,
                                          "kto": kto_rows}[fmt]()
    data_file = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    data = {"train": [{"path": str(data_file), "format": fmt}], "template": "chatml", "max_length": 64,
            **sections.pop("data", {})}
    return make_recipe(tmp_path, model_dir, rows=[], data=data, train={**PREF_TRAIN, "method": method,
                                                                       **sections.pop("train", {})}, **sections)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_problems(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, list(overrides))
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# recipe keys


def test_method_keys_are_checked_and_named(tmp_path, tiny_model_dir):
    p = pref_recipe(tmp_path, tiny_model_dir)
    assert load_recipe(p).train.method == "dpo"
    assert load_recipe(make_recipe(tmp_path / "sft", tiny_model_dir)).train.method == "sft"  # old recipes unchanged
    assert "preference.simpo_gamma: not used by train.method dpo" in recipe_problems(p, "preference.simpo_gamma=0.5")
    assert "preference.reference: not used by train.method orpo" in recipe_problems(
        p, "train.method=orpo", "preference.reference=base")
    assert "preference.loss_type: 'kto' is not a dpo loss" in recipe_problems(p, "preference.loss_type=kto")
    assert "preference.betta: unknown key (did you mean preference.beta?)" in recipe_problems(p, "preference.betta=1")
    assert "data.train[0].format: train.method kto reads kto rows" in recipe_problems(p, "train.method=kto")
    assert "data.train[0].format: preference is preference data" in recipe_problems(p, "train.method=sft")
    assert "preference: only used by a preference method" in recipe_problems(p, "train.method=sft",
                                                                              "data.train[0].format=alpaca",
                                                                              "preference.beta=0.2")
    assert "data.packing: train.method dpo does not pack" in recipe_problems(p, "data.packing=true")
    assert "model.adapter: no adapter here" in recipe_problems(p, f"model.adapter={tmp_path}")
    ok = load_recipe(p, ["preference.beta=0.2", "preference.loss_type=ipo", "preference.reference=base"])
    assert ok.preference.beta == 0.2
    # dpo sums a list of losses, with one weight per loss; kto takes one loss of its own.
    assert load_recipe(p, ["preference.loss_type=[sigmoid, sft]", "preference.loss_weights=[1, 0.5]"]
                       ).preference.loss_type == ["sigmoid", "sft"]
    assert "preference.loss_weights: 1 weights for 2 loss_type entries" in recipe_problems(
        p, "preference.loss_type=[sigmoid, sft]", "preference.loss_weights=[1]")
    assert "preference.loss_type: 'kto' is not a dpo loss" in recipe_problems(p, "preference.loss_type=[sigmoid, kto]")
    assert "preference.loss_type: an empty list" in recipe_problems(p, "preference.loss_type=[]")
    assert "preference.loss_type: kto takes one loss, not a list" in recipe_problems(
        p, "train.method=kto", "data.train[0].format=kto", "preference.loss_type=[kto]")
    assert "preference.loss_weights: not used by train.method kto" in recipe_problems(
        p, "train.method=kto", "data.train[0].format=kto", "preference.loss_weights=[1]")


# ---------------------------------------------------------------------------------------------
# data


def prepared(path: Path, *overrides: str):
    from finetune.data import prepare_for
    from finetune.train import load_tokenizer_and_template

    r = load_recipe(path, list(overrides))
    _, tok, template = load_tokenizer_and_template(r)
    return prepare_for(r, tok, template, use_cache=False), tok, template


@pytest.mark.parametrize("fmt,bad,line,message", [
    ("preference", {"prompt": "p", "chosen": "same", "rejected": " same"}, 3,
     "chosen and rejected replies are identical"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "  "}, 3, "field 'rejected' is empty"),
    ("preference_messages", {"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
                             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     3, "the prompt differs between chosen and rejected (turn 0)"),
    ("preference_messages", {"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": ""}],
                             "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]},
     3, "empty assistant reply"),
    ("kto", {"prompt": "p", "completion": "a", "label": "maybe"}, 3, "field 'label' must be true or false"),
])
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path, tiny_model_dir, fmt, bad, line, message):
    good = {"preference": pair_rows, "preference_messages": messages_rows, "kto": kto_rows}[fmt](8)
    rows = good[:2] + [bad] + good[2:]
    p = pref_recipe(tmp_path, tiny_model_dir, rows=rows, fmt=fmt, method="kto" if fmt == "kto" else "dpo")
    with pytest.raises(Exception) as e:
        prepared(p)
    assert str(e.value).startswith(f"{tmp_path / (fmt + '.jsonl')}:{line}: ") and message in str(e.value), str(e.value)
    ok, _, _ = prepared(p, "data.on_bad_row=skip")
    assert ok.report["skipped_rows"]["count"] == 1 and ok.report["rows"]["train"] == 8


def test_pairs_render_prompt_once_and_supervise_replies_with_end_token(tmp_path, tiny_model_dir):
    from finetune.data import prompt_ids

    p = pref_recipe(tmp_path, tiny_model_dir, fmt="preference_messages")
    prep, tok, template = prepared(p)
    row, ex = prep.train[0], messages_rows()[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # The prompt is exactly what generation feeds the model; each reply is the reply text and the end token.
    assert row["prompt_ids"] == prompt_ids(ex["chosen"][:1], tok, template)
    for side in ("chosen", "rejected"):
        ids = row[f"{side}_ids"]
        assert ids[-1] == end and end not in ids[:-1]
        assert tok.decode(ids[:-1]) == ex[side][-1]["content"]
    # The same rows as plain strings give the same ids.
    plain, _, _ = prepared(pref_recipe(tmp_path / "plain", tiny_model_dir, fmt="preference"))
    assert plain.train[0] == row


def test_length_rule_truncates_and_counts(tmp_path, tiny_model_dir):
    rows = pair_rows(8)
    rows[0] = {**rows[0], "prompt": " ".join(["question"] * 60)}
    rows[1] = {**rows[1], "chosen": " ".join(["yes"] * 60)}
    p = pref_recipe(tmp_path, tiny_model_dir, rows=rows)
    prep, tok, _ = prepared(p, "preference.max_prompt_length=16")
    assert prep.report["truncation"] == {"prompt_truncated": 1, "reply_truncated": 1}
    for r in prep.train:
        assert len(r["prompt_ids"]) <= 16
        assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 64
    assert tok.decode(prep.train[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")  # the prompt keeps its end
    dropped, _, _ = prepared(p, "preference.max_prompt_length=16", "data.too_long=drop")
    assert dropped.report["dropped"]["count"] == 2 and dropped.report["rows"]["train"] == 6


def test_finetune_data_shows_pairs_with_supervised_spans(tmp_path, tiny_model_dir):
    p = pref_recipe(tmp_path, tiny_model_dir, data={"held_out": 4})
    r = cli("data", p, "--no-color")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "data: 20 train rows, 4 held out" in out
    for part in ("prompt tokens:", "chosen tokens:", "rejected tokens:", "length rule: prompt keeps its last 32"):
        assert part in out, out
    assert "chosen: [[yes " in out and "<|im_end|>]]" in out and "rejected: [[no " in out
    held = [json.loads(line) for line in (tmp_path / "run" / "held_out.jsonl").read_text().splitlines()]
    assert len(held) == 4 and all(h["rejected"] and h["messages"][-1]["content"] == h["chosen"] for h in held)


# ---------------------------------------------------------------------------------------------
# training


def train_run(path: Path, *overrides: str) -> Path:
    from finetune.train import train

    return train(load_recipe(path, list(overrides)), path, overrides=list(overrides))


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A DPO run on the tiny 4-bit model (held-out pairs: eval metrics and merge probes), trained once."""
    tmp = tmp_path_factory.mktemp("dpo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_run(pref_recipe(tmp, tiny_model_dir, data={"held_out": 4}))
    finally:
        torch.set_num_threads(threads)


def test_dpo_trains_lora_on_the_4bit_base_against_the_adapter_off_reference(dpo_run, tiny_model_dir):
    rows = log_rows(dpo_run)
    steps = [r for r in rows if "loss" in r]
    # Step 1: policy == reference (a fresh adapter is the identity), so every margin is 0 and the loss is log 2.
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0.3 and steps[-1]["rewards/accuracies"] == 1.0
    assert steps[-1]["logps/chosen"] > steps[0]["logps/chosen"] and steps[-1]["logps/rejected"] < steps[0]["logps/rejected"]
    assert any("eval_rewards/accuracies" in r for r in rows)
    manifest = json.loads((dpo_run / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["start_adapter"] is None
    assert json.loads((dpo_run / "data_report.json").read_text())["rows"] == {"train": 20, "held_out": 4}
    report = (dpo_run / "report.md").read_text()
    assert "- reward margin: 0 → " in report and "- reward accuracy (chosen preferred): " in report
    assert "- chosen log-prob: " in report and "- rejected log-prob: " in report
    assert (dpo_run / "loss.png").stat().st_size > 0
    # adapter/ holds the trained adapter only (not TRL's frozen reference copy), and it moved.
    adapter = dpo_run / "adapter"
    assert not (adapter / "ref").exists()
    weights = load_file(adapter / "adapter_model.safetensors")
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b and all(w.dtype == torch.float32 for w in b) and max(float(w.abs().max()) for w in b) > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)


def test_dpo_starts_from_an_sft_adapter_and_its_reference_is_that_adapter_frozen(tmp_path, tiny_model_dir):
    from finetune import rundir

    sft = train_run(make_recipe(tmp_path / "sft", tiny_model_dir, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                train={"max_steps": 3, "learning_rate": 2e-2, "report_to": ["none"],
                                       "gradient_checkpointing": False}))
    path = pref_recipe(tmp_path / "dpo", tiny_model_dir, train={"max_steps": 1})
    raw = yaml.safe_load(path.read_text())
    raw["model"]["adapter"] = str(sft)  # a run directory: its adapter/ is used (and checked against its marker)
    raw["lora"] = {"dropout": 0.0}      # the adapter's own shape applies
    path.write_text(yaml.safe_dump(raw))
    first = {}
    for reference in ("start", "base"):
        run = train_run(path, f"output_dir={tmp_path / reference}", f"preference.reference={reference}")
        first[reference] = log_rows(run)[0]
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["start_adapter"]["sha256"] == rundir.adapter_sha(sft)
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # start: the reference is the SFT adapter, frozen, so the first step has margin 0 (loss log 2) ...
    assert first["start"]["loss"] == pytest.approx(0.693147, abs=1e-5)
    # ... base: the reference is the base with the adapter off, which the SFT adapter has moved away from.
    assert abs(first["base"]["rewards/margins"]) > 1e-3 and first["base"]["loss"] != pytest.approx(0.693147, abs=1e-3)


@pytest.mark.parametrize("method,fmt", [("dpo", "preference"), ("kto", "kto")])
def test_precomputed_reference_trains_like_the_live_one(tmp_path, tiny_model_dir, monkeypatch, method, fmt):
    """reference: precomputed scores the reference (here the base with the fresh adapter off) once before training
    instead of in every step; the steps must not notice: the same losses and margins as the live reference."""
    import importlib

    # Count the reference forwards (TRL turns the adapter off through use_adapter for each), inside a training step
    # or outside one (precomputation runs when the trainer is built).
    module = importlib.import_module(f"trl.trainer.{method}_trainer")
    trainer_cls = getattr(module, f"{method.upper()}Trainer")
    where, reference_passes = ["outside"], []
    real_use_adapter, real_step = module.use_adapter, trainer_cls.training_step

    def counted_use_adapter(*a, **k):
        reference_passes.append(where[0])
        return real_use_adapter(*a, **k)

    def step(self, *a, **k):
        where[0] = "step"
        try:
            return real_step(self, *a, **k)
        finally:
            where[0] = "outside"

    monkeypatch.setattr(module, "use_adapter", counted_use_adapter)
    monkeypatch.setattr(trainer_cls, "training_step", step)
    path = pref_recipe(tmp_path, tiny_model_dir, fmt=fmt, method=method, lora={"dropout": 0.0})
    logs, passes = {}, {}
    for reference in ("start", "precomputed"):
        reference_passes.clear()
        run = train_run(path, "train.max_steps=4", f"preference.reference={reference}",
                        f"output_dir={tmp_path / reference}")
        logs[reference], passes[reference] = [r for r in log_rows(run) if "loss" in r], list(reference_passes)
    assert len(logs["precomputed"]) == 4
    # live: one reference forward in each of the 4 steps; precomputed: all before training (24 rows / 4 per batch)
    assert passes["start"] == ["step"] * 4
    assert passes["precomputed"] == ["outside"] * 6
    for live, pre in zip(logs["start"], logs["precomputed"]):
        assert pre["loss"] == pytest.approx(live["loss"], rel=1e-4, abs=1e-6)
        assert pre["rewards/margins"] == pytest.approx(live["rewards/margins"], rel=1e-3, abs=1e-5)
    assert abs(logs["start"][-1]["rewards/margins"]) > 0.05  # the reference mattered: the policy moved off it


def test_dpo_with_an_sft_term_adds_the_weighted_chosen_nll(tmp_path, tiny_model_dir):
    """loss_type [sigmoid, sft] goes to TRL as summed losses: at step 1 policy == reference, so the DPO part is
    exactly log 2 and the rest is weight x the chosen replies' NLL; doubling the weight doubles the excess."""
    path = pref_recipe(tmp_path, tiny_model_dir)
    first = {}
    for w in (0.5, 1.0):
        run = train_run(path, "train.max_steps=1", "preference.loss_type=[sigmoid, sft]",
                        f"preference.loss_weights=[1.0, {w}]", f"output_dir={tmp_path / f'w{w}'}")
        first[w] = [r for r in log_rows(run) if "loss" in r][0]["loss"] - 0.693147
    assert first[0.5] > 0.5  # the chosen replies' NLL under a random tiny model: several nats
    assert first[1.0] == pytest.approx(2 * first[0.5], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# every method end to end: train, kill -9 + --resume, merge, export, evaluate

METHODS = {"dpo": ("preference", {}), "orpo": ("preference", {}), "kto": ("kto", {"desirable_weight": 1.0}),
           "simpo": ("preference_messages", {"simpo_gamma": 0.3})}  # format, preference keys
N_STEPS = 8
every_method = pytest.mark.parametrize("method_run", list(METHODS), indirect=True)


@pytest.fixture(scope="module")
def method_run(request, tmp_path_factory, tiny_model_dir):
    """One uninterrupted run of a method (grad_accum 2, LoRA dropout on, a checkpoint every 2 steps, 4 held-out
    rows), trained once per module: what a resumed run must equal, and the run that is merged, exported, evaluated."""
    method = request.param
    fmt, keys = METHODS[method]
    tmp = tmp_path_factory.mktemp(method)
    # the method's keys in the recipe itself, so a killed run and its --resume see them too
    path = pref_recipe(tmp, tiny_model_dir, fmt=fmt, method=method, lora={"r": 8, "alpha": 16, "dropout": 0.1},
                       data={"held_out": 4}, train={"max_steps": N_STEPS, "grad_accum": 2, "save_steps": 2,
                                                    "save_total_limit": 2, "eval_steps": 4},
                       **({"preference": keys} if keys else {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return SimpleNamespace(method=method, path=path, run=train_run(path, f"output_dir={tmp / 'A'}"))
    finally:
        torch.set_num_threads(threads)


@every_method
def test_each_method_trains_on_the_tiny_4bit_model(method_run):
    run = method_run.run
    steps = [r for r in log_rows(run) if "loss" in r]
    assert len(steps) == N_STEPS and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # On the same held-out pairs, each method's own margin (chosen reward - rejected reward) grows and its loss falls.
    held = [r for r in log_rows(run) if "eval_loss" in r]
    assert len(held) >= 2 and held[-1]["eval_rewards/margins"] > held[0]["eval_rewards/margins"] + 0.02, held
    assert held[-1]["eval_loss"] < held[0]["eval_loss"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "adapter" / "ref").exists()
    assert json.loads((run / "manifest.json").read_text())["method"] == method_run.method


@every_method
def test_resume_from_the_last_checkpoint_equals_uninterrupted(method_run, tmp_path):
    """What kill -9 after the last step's log line and before its checkpoint leaves: the checkpoint before, a log
    that runs past it, no adapter. --resume must redo the lost steps exactly (the method's own trainer state: the
    reference, KTO's mismatched-pair KL batches, the data order and the RNG)."""
    import shutil

    from finetune import checkpoints as ck
    from test_reliability import assert_continues_like

    a, b = method_run.run, tmp_path / "B"
    shutil.copytree(a, b)
    shutil.rmtree(b / "adapter")
    ck.remove(ck.latest_complete(b / "checkpoints"))
    resumed_at = ck.step_of(ck.latest_complete(b / "checkpoints"))
    assert resumed_at == N_STEPS - 2 and max(r["step"] for r in log_rows(b) if "loss" in r) == N_STEPS
    r = cli("train", method_run.path, f"output_dir={b}", "--resume")
    assert r.exit_code == 0, r.output
    assert_continues_like(a, b, resumed_at, N_STEPS)  # per-step loss and lr equal, adapter tensors bit-identical


@pytest.mark.parametrize("method_run", ["dpo", *[pytest.param(m, marks=pytest.mark.slow) for m in METHODS
                                                 if m != "dpo"]], indirect=True)
def test_kill9_then_resume_equals_uninterrupted(method_run, tmp_path, monkeypatch):
    import random
    import signal

    from test_reliability import SLOW_STEPS, assert_continues_like, complete_steps, launch, wait_for_step

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a, b, log = method_run.run, tmp_path / "B", tmp_path / "b.log"
    k = random.randint(3, N_STEPS - 2)
    proc = launch(["train", method_run.path, f"output_dir={b}"], log, inject=SLOW_STEPS)
    wait_for_step(b, k, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (b / "adapter").exists()
    resumed_at = complete_steps(b)[-1]
    assert 2 <= resumed_at < N_STEPS
    r = cli("train", method_run.path, f"output_dir={b}", "--resume")
    assert r.exit_code == 0, r.output
    assert_continues_like(a, b, resumed_at, N_STEPS)  # per-step loss and lr equal, adapter tensors bit-identical
    margins = {x["step"]: x["rewards/margins"] for x in log_rows(b) if "rewards/margins" in x}
    assert margins == {x["step"]: x["rewards/margins"] for x in log_rows(a) if "rewards/margins" in x}


@every_method
def test_each_method_merges_exports_and_evaluates(method_run, tmp_path):
    """Merge, export and eval need nothing preference-specific: the SFT fidelity figures, the SFT export, and the
    preference eval task (base vs tuned on unseen pairs) beside a generation task."""
    import shutil

    from finetune.evaluate.runner import evaluate_run
    from finetune.merge import merge_run
    from finetune.recipe import EvalTask, load_resolved

    run = tmp_path / "run"
    shutil.copytree(method_run.run, run)
    merge_run(run)
    fid = json.loads((run / "merged" / "fidelity.json").read_text())
    assert fid["base"] == "dequantized" and fid["probes"] == "4 held-out rows"
    assert fid["argmax_agreement"] >= 0.999 and fid["mean_kl"] <= 1e-4  # as tests/test_merge.py for SFT
    assert fid["adapter_vs_base_mean_kl"] > 1000 * max(fid["mean_kl"], 1e-9)
    r = cli("export", run, "--format", "hf", "gguf", "ollama")
    assert r.exit_code == 0, r.output
    assert list((run / "export").rglob("*.gguf")) and list((run / "export").rglob("Modelfile"))

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(60)[30:])  # unseen rows, same task
    recipe = load_resolved(run / "resolved.yaml")
    tasks = [EvalTask(name="held_out", kind="held_out", max_new_tokens=8),
             EvalTask(name="pairs", kind="preference", path=str(pairs))]
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"tasks": tasks})})
    results = json.loads(evaluate_run(run, recipe, echo=lambda *_: None).read_text())["results"]
    row = {(r["task"], r["metric"], r["model"]): r for r in results}
    tuned, base = row[("pairs", "preference_acc", "adapter")], row[("pairs", "preference_acc", "base")]
    assert tuned["n"] == 30 and tuned["value"] > base["value"] and tuned["delta_ci95"][0] > 0
    assert row[("held_out", "stop_rate", "adapter")]["n"] == 4


# ---------------------------------------------------------------------------------------------
# evaluation


def test_eval_preference_task_base_vs_tuned_with_paired_ci(dpo_run, tmp_path):
    import shutil

    from finetune.evaluate.runner import evaluate_run
    from finetune.recipe import EvalTask, load_resolved

    run = tmp_path / "run"
    shutil.copytree(dpo_run, run)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(60)[30:])  # unseen rows, same task
    recipe = load_resolved(run / "resolved.yaml")
    tasks = [EvalTask(name="held_out", kind="held_out", max_new_tokens=8),
             EvalTask(name="pairs", kind="preference", path=str(pairs)),
             EvalTask(name="held_pairs", kind="preference")]
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"tasks": tasks})})
    results = json.loads(evaluate_run(run, recipe, echo=lambda *_: None).read_text())["results"]
    row = {(r["task"], r["metric"], r["model"]): r for r in results}
    acc = row[("pairs", "preference_acc", "adapter")]
    assert acc["n"] == 30 and acc["value"] == 1.0 and row[("pairs", "preference_acc", "base")]["value"] < 0.8
    assert acc["delta_ci95"][0] > 0  # the paired bootstrap interval excludes zero
    assert row[("pairs", "logp_margin", "adapter")]["delta_ci95"][0] > 0
    assert row[("held_pairs", "preference_acc", "adapter")]["n"] == 4
    assert ("held_out", "stop_rate", "adapter") in row  # generation tasks work unchanged on a preference run
    assert "preference_acc" in (run / "eval" / "table.md").read_text() and "preference_acc" in (run / "report.md").read_text()


def test_eval_preference_rows_are_checked_with_file_line(dpo_run, tmp_path):
    from finetune.evaluate.tasks import load_items
    from finetune.recipe import EvalTask

    bad = write_jsonl(tmp_path / "bad.jsonl", pair_rows(2) + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(Exception) as e:
        load_items(EvalTask(name="p", kind="preference", path=str(bad)), dpo_run, None, None)
    assert str(e.value).startswith(f"{bad}:3: ") and "identical" in str(e.value)


def test_preference_score_is_length_normalised(tiny_tokenizer, monkeypatch):
    from types import SimpleNamespace

    from finetune.evaluate import scoring
    from finetune.evaluate.tasks import Item
    from finetune.templates import load_template

    seen = []

    def fake_nll(model, seqs, pad_id, batch_size=8, desc=None):
        seen.extend(seqs)
        return [(10.0, 10), (4.0, 2)]  # chosen: -1 per token (-10 in all); rejected: -2 per token (-4 in all)

    monkeypatch.setattr(scoring, "masked_nll", fake_nll)
    ctx = SimpleNamespace(tok=tiny_tokenizer, template=load_template("chatml"))
    item = Item("x", [{"role": "user", "content": "q"}], ["yes red"], choices=["yes red", "no"], answer=0)
    out = scoring.preference_scores(ctx, None, None, [item], 8, "t")
    assert out.values == {"preference_acc": [1.0], "logp_margin": [1.0]}
    # Each reply is scored on the template's reply span: the reply tokens and the end token, after the prompt.
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for (ids, labels), reply in zip(seen, item.choices):
        scored = [t for t in labels if t != -100]
        assert scored[-1] == end and tiny_tokenizer.decode(scored[:-1]) == reply and ids[-len(scored):] == scored


# ---------------------------------------------------------------------------------------------
# the planner


def _dpo_step_peak(path: Path, ckpt: bool) -> tuple[int, object, int]:
    """Profiler peak of one DPO step (policy forward on chosen+rejected, reference forward, backward, AdamW) built
    by train.py's own steps, the recipe, and the padded sequence length."""
    from finetune import train as T
    from finetune.memory import profiled_peak

    recipe = load_recipe(path, [f"train.gradient_checkpointing={str(ckpt).lower()}"])
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    r = T.setup(recipe, path, False, False, [], None)
    prep = T.prepare_data(r)
    model = T.build_model(r)
    trainer = T.build_trainer(r, prep, model)
    batch = trainer.data_collator([prep.train[i] for i in range(recipe.train.micro_batch_size)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        trainer.compute_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return profiled_peak(step), recipe, batch["input_ids"].shape[1]


@pytest.mark.parametrize("ckpt", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_plan_counts_chosen_and_rejected_and_matches_the_profiler(tmp_path, tiny_model_dir, ckpt):
    from finetune import plan as P

    rows = [{"prompt": " ".join(["what"] * 40) + f" {i}", "chosen": " ".join(["yes"] * 30),
             "rejected": " ".join(["no"] * 30)} for i in range(8)]  # every pair fills max_length
    path = pref_recipe(tmp_path, tiny_model_dir, rows=rows, data={"max_length": 48})
    measured, recipe, seq = _dpo_step_peak(path, ckpt)
    assert seq == 48
    plan = P.plan_recipe(recipe, None, device="cpu", seq_len=seq)
    assert plan.part("activations") == pytest.approx(measured, rel=0.03)
    # The same recipe as SFT plans half the rows per forward pass and SFT's own loss.
    sft = recipe.model_copy(update={"train": recipe.train.model_copy(update={"method": "sft"}), "preference": None,
                                    "data": recipe.data.model_copy(update={"packing": False})})
    assert P.setup_from_recipe(recipe, device="cpu").batch == 2 * P.setup_from_recipe(sft, device="cpu").batch == 8


def test_gradient_checkpointing_auto_decides_with_the_preference_terms(tmp_path, tiny_model_dir):
    from finetune import plan as P
    from finetune.plan.from_recipe import auto_checkpointing
    from finetune.plan.shapes import resolve_shape

    recipe = load_recipe(pref_recipe(tmp_path, tiny_model_dir), ["train.gradient_checkpointing=auto"])
    sft = recipe.model_copy(update={"train": recipe.train.model_copy(update={"method": "sft"}), "preference": None,
                                    "data": recipe.data.model_copy(update={"packing": False})})
    shape, _ = resolve_shape(recipe.model.base)
    need = {}
    for name, r in (("dpo", recipe), ("sft", sft)):
        setup = P.setup_from_recipe(r, device="cpu")
        need[name] = P.estimate(shape, setup.__class__(**{**setup.__dict__, "gradient_checkpointing": False}),
                                None).total
    assert need["dpo"] > need["sft"]
    memory = int((need["dpo"] + need["sft"]) / 2 / 0.5)  # between the two, at auto's 50% of RAM on a CPU
    assert auto_checkpointing(shape, P.setup_from_recipe(recipe, device="cpu"), memory)[0] is True
    assert auto_checkpointing(shape, P.setup_from_recipe(sft, device="cpu"), memory)[0] is False
