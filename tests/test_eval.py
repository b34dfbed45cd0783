"""`finetune eval` on a tiny trained run: every task kind, base vs adapter, and the numbers in the report."""

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import make_recipe
from tiny import write_jsonl

from finetune.evaluate import EvalError, evaluate_run
from finetune.evaluate.generation import stop_token_ids
from finetune.evaluate.scoring import choice_scores, generation_scores
from finetune.evaluate.tasks import Item
from finetune.recipe import EvalTask, load_recipe, validate_recipe
from finetune.templates import load_template

QA = [{"question": "what is red", "answer": "one", "choices": ["one", "two", "three four"], "label": 0},
      {"question": "what is green", "answer": "two", "choices": ["one", "two", "three four"], "label": 1},
      {"question": "what is blue", "answer": "three", "choices": ["one", "two", "three four"], "label": 2}]


def lm_eval_tasks(folder: Path) -> Path:
    """Two local lm-eval tasks (generate_until and multiple_choice) over a local JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "qa.jsonl", QA)
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{question}}"}
    gen = {"task": "ft_gen", **common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    mc = {"task": "ft_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{label}}",
          "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}
    for task in (gen, mc):
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    from finetune.train import train

    root = tmp_path_factory.mktemp("evalrun")
    gen = write_jsonl(root / "gen.jsonl", [{"instruction": "what is red", "reference": "one"},
                                           {"messages": [{"role": "user", "content": "what is green"},
                                                         {"role": "assistant", "content": "two"}]},
                                           {"question": "what is blue", "references": ["three", "3"]}])
    mc = write_jsonl(root / "mc.jsonl", [{"question": q["question"], "choices": q["choices"], "answer": q["label"]}
                                         for q in QA])
    tasks = [{"name": "held", "kind": "held_out", "metrics": ["exact_match", "contains"], "max_new_tokens": 12},
             {"name": "gen", "kind": "generate", "path": str(gen), "metrics": ["exact_match", "chrf"],
              "max_new_tokens": 8},
             {"name": "mc", "kind": "multiple_choice", "path": str(mc)},
             {"name": "lme", "kind": "lm_eval", "lm_eval_tasks": ["ft_gen", "ft_mc"],
              "include_path": str(lm_eval_tasks(root / "lm_tasks"))}]
    # eval_steps past the end: no trainer-side held-out loss at every step (this test measures it itself).
    path = make_recipe(root, tiny_model_dir, data={"held_out": 8}, train={"eval_steps": 100},
                       eval={"tasks": tasks, "bootstrap": 200})
    recipe = load_recipe(path)
    train(recipe, path)
    return Path(recipe.output_dir)


@pytest.fixture(scope="module")
def evaluated(trained_run):
    evaluate_run(trained_run, echo=lambda m: None)
    return trained_run, json.loads((trained_run / "eval" / "results.json").read_text())


def rows_of(results, task, metric):
    return {r["model"]: r for r in results["results"] if r["task"] == task and r["metric"] == metric}


def test_eval_writes_results_predictions_and_report(evaluated):
    run, results = evaluated
    assert results["models"] == ["base", "adapter"]
    tasks = {r["task"] for r in results["results"]}
    assert tasks == {"held", "gen", "mc", "lme/ft_gen", "lme/ft_mc"}
    loss = rows_of(results, "held", "loss")
    assert loss["base"]["n"] == 8 and loss["base"]["value"] != pytest.approx(loss["adapter"]["value"], abs=1e-3)
    assert loss["adapter"]["delta"] == pytest.approx(loss["adapter"]["value"] - loss["base"]["value"])
    lo, hi = loss["adapter"]["delta_ci95"]
    assert lo <= loss["adapter"]["delta"] <= hi
    assert rows_of(results, "held", "perplexity")["base"]["value"] == pytest.approx(math.exp(loss["base"]["value"]))
    for metric in ("exact_match", "contains", "stop_rate"):
        assert set(rows_of(results, "held", metric)) == {"base", "adapter"}

    for name in ("held", "gen", "mc", "lme_ft_gen", "lme_ft_mc"):
        preds = [json.loads(line) for line in (run / "eval" / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert preds and all({"prompt", "reference", "base", "adapter"} <= set(p) for p in preds)
    held = [json.loads(line) for line in (run / "eval" / "predictions" / "held.jsonl").read_text().splitlines()]
    # The adapter changed what the model says (the base is a random model; 4 steps taught it the format).
    assert any(p["base"] != p["adapter"] for p in held)
    assert "## Evaluation (base vs fine-tuned)" in (run / "report.md").read_text()
    assert "![loss](../loss.png)" in (run / "eval" / "report.md").read_text()


def _close(cell: str, value: float) -> bool:
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-9


def test_every_number_in_report_matches_results_json(evaluated):
    run, results = evaluated
    report = (run / "eval" / "report.md").read_text()
    models = results["models"]
    body = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert len(body) == len({(r["task"], r["metric"]) for r in results["results"]})
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        task, metric = cells[0], cells[1].replace(" ↓", "")
        by_model = rows_of(results, task, metric)
        assert int(cells[2]) == next(iter(by_model.values()))["n"]
        for model, cell in zip(models, cells[3:3 + len(models)]):
            assert _close(cell, by_model[model]["value"]), (task, metric, model, cell)
        delta = cells[3 + len(models)]
        nums = re.findall(r"[-+]?\d+\.\d+", delta)
        row = by_model["adapter"]
        assert _close(nums[0], row["delta"]) and _close(nums[1], row["delta_ci95"][0]) and _close(nums[2], row["delta_ci95"][1])
        assert delta.startswith("**") == (row["delta_ci95"][0] > 0 or row["delta_ci95"][1] < 0)
    # Outside the table the only numbers are the "95%" label and the bootstrap count.
    rest = "\n".join(line for line in report.splitlines() if not line.startswith("|"))
    assert set(re.findall(r"\d+(?:\.\d+)?", rest)) <= {"95", str(results["bootstrap"])}
    assert (run / "eval" / "table.md").read_text().strip() in report


def test_lm_eval_local_task_on_base_and_adapter(evaluated):
    """A local YAML over a local JSONL, offline; the numbers agree with the per-document outputs."""
    run, results = evaluated
    preds = {n: [json.loads(line) for line in (run / "eval" / "predictions" / f"lme_{n}.jsonl").read_text().splitlines()]
             for n in ("ft_gen", "ft_mc")}
    for model in ("base", "adapter"):
        acc = rows_of(results, "lme/ft_mc", "acc")[model]
        assert acc["n"] == len(QA)
        chosen = [int(p[model]) for p in preds["ft_mc"]]
        assert acc["value"] == pytest.approx(sum(c == q["label"] for c, q in zip(chosen, QA)) / len(QA))
        em = rows_of(results, "lme/ft_gen", "exact_match")[model]
        assert em["value"] == pytest.approx(sum(p[model] == p["reference"] for p in preds["ft_gen"]) / len(QA))
    # With and without the adapter really are different models: the choice log-likelihoods moved.
    lls = [(p["details"]["base"]["loglikelihoods"], p["details"]["adapter"]["loglikelihoods"]) for p in preds["ft_mc"]]
    assert any(abs(a - b) > 1e-4 for base, tuned in lls for a, b in zip(base, tuned))


def _ctx(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    template = load_template("chatml", tok)
    return SimpleNamespace(tok=tok, template=template, stops=stop_token_ids(tok, template))


def test_multiple_choice_equals_direct_loglikelihood(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.data import prompt_ids

    ctx = _ctx(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    items = [Item(f"q{i}", [{"role": "user", "content": q["question"]}], choices=q["choices"], answer=q["label"])
             for i, q in enumerate(QA)]
    task = EvalTask(name="mc", kind="multiple_choice", path="x.jsonl")
    got = choice_scores(ctx, model, task, items, batch_size=4, label="mc")  # batched, padded, sorted by length
    for item, out in zip(items, got.outputs):
        direct = []
        for choice in item.choices:
            ctx_ids = prompt_ids(item.prompt, ctx.tok, ctx.template)
            cont = ctx.tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont])).logits[0].double(), -1)
            direct.append(sum(float(logp[len(ctx_ids) + j - 1, t]) for j, t in enumerate(cont)))
        assert out["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
        best = max(range(3), key=lambda j: direct[j])
        best_norm = max(range(3), key=lambda j: direct[j] / len(item.choices[j]))
        assert (out["choice"], out["choice_norm"]) == (best, best_norm)
    assert got.values["acc"] == [float(o["choice"] == it.answer) for o, it in zip(got.outputs, items)]


def _always(model, token_id: int):
    """The real model with an output bias that makes `token_id` the greedy choice at every step."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token_id] = 1e4
    model.lm_head = head
    return model


def test_stop_rate_is_zero_or_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ctx = _ctx(tiny_model_dir)
    items = [Item(str(i), [{"role": "user", "content": f"what is {w}"}], ["x"]) for i, w in enumerate(["red", "a b c"])]
    task = EvalTask(name="g", kind="generate", path="x.jsonl", max_new_tokens=5)
    end_id = ctx.tok.convert_tokens_to_ids("<|im_end|>")
    other = ctx.tok.convert_tokens_to_ids("the")

    never = _always(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), other)
    out = generation_scores(ctx, never, task, items, batch_size=2, label="never")
    assert out.values["stop_rate"] == [0.0, 0.0]
    assert [o["tokens"] for o in out.outputs] == [5, 5]

    assert out.values["end_token_rate"] == [0.0, 0.0] and [o["stop_token"] for o in out.outputs] == [None, None]

    always = _always(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), end_id)
    out = generation_scores(ctx, always, task, items, batch_size=2, label="always")
    assert out.values["stop_rate"] == [1.0, 1.0]
    assert [o["text"] for o in out.outputs] == ["", ""]
    assert out.values["end_token_rate"] == [1.0, 1.0]
    assert [o["stop_token"] for o in out.outputs] == ["<|im_end|>", "<|im_end|>"]


def test_end_token_rate_tells_eos_from_the_templates_end_token(tiny_model_dir):
    """chatml's end token is <|im_end|>, the tiny tokenizer's EOS </s>: both stop a reply (stop_rate), but only the
    template's own end token counts in end_token_rate. A template that ends turns with EOS has no such row."""
    from transformers import AutoModelForCausalLM

    ctx = _ctx(tiny_model_dir)
    items = [Item("0", [{"role": "user", "content": "what is red"}], ["x"])]
    task = EvalTask(name="g", kind="generate", path="x.jsonl", max_new_tokens=5)
    eos = _always(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
                  ctx.tok.eos_token_id)
    out = generation_scores(ctx, eos, task, items, batch_size=1, label="eos")
    assert out.values["stop_rate"] == [1.0] and out.values["end_token_rate"] == [0.0]
    assert out.outputs[0]["stop_token"] == "</s>"
    template = load_template("zephyr", ctx.tok)  # end of turn: eos_token
    ctx = SimpleNamespace(tok=ctx.tok, template=template, stops=stop_token_ids(ctx.tok, template))
    out = generation_scores(ctx, eos, task, items, batch_size=1, label="eos")
    assert out.values["stop_rate"] == [1.0] and "end_token_rate" not in out.values


def test_batched_left_padded_generation_equals_one_by_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.data import prompt_ids
    from finetune.evaluate.generation import greedy_generate
    from finetune.models import fix_pad_token

    ctx = _ctx(tiny_model_dir)
    fix_pad_token(ctx.tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [prompt_ids([{"role": "user", "content": c}], ctx.tok, ctx.template)
               for c in ("what is red", "the quick brown fox jumps over a lazy dog what is", "hi")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch really is padded
    batched = greedy_generate(model, ctx.tok, prompts, ctx.stops, 10, batch_size=3)
    single = [greedy_generate(model, ctx.tok, [p], ctx.stops, 10, batch_size=1)[0] for p in prompts]
    assert [(g.text, g.stopped) for g in batched] == [(g.text, g.stopped) for g in single]
    assert any(g.text for g in batched)


def test_dense_cpu_copy_of_the_4bit_base_computes_the_same(trained_run):
    """Eval on the CPU dequantises the NF4 base once instead of at every token: same logits, base and tuned."""
    import bitsandbytes as bnb

    from finetune.evaluate.loading import as_model, load_tuned, open_run

    ctx = open_run(trained_run)
    quantized, dense = load_tuned(ctx, dense_on_cpu=False), load_tuned(ctx)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    ids = torch.tensor([ctx.tok("what is red the answer", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        for name in ("base", "adapter"):
            with as_model(quantized, name), as_model(dense, name):
                a, b = quantized(input_ids=ids).logits, dense(input_ids=ids).logits
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (name, (a - b).abs().max())
        with as_model(dense, "base"):
            base = dense(input_ids=ids).logits
        assert not torch.allclose(base, dense(input_ids=ids).logits, atol=1e-4)  # the adapter does something


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    return dest


def test_limit_and_task_errors(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    raw = yaml.safe_load((run / "resolved.yaml").read_text())
    raw["eval"]["tasks"] = [raw["eval"]["tasks"][0]]
    evaluate_run(run, recipe=validate_recipe(raw), limit=2, echo=lambda m: None)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["limit"] == 2 and {r["n"] for r in results["results"]} == {2}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok", "reference": "x"}\n{"question": "no reference"}\n')
    raw["eval"]["tasks"] = [{"name": "g", "kind": "generate", "path": str(bad)}]
    with pytest.raises(EvalError, match=re.escape(f"{bad}:2: no reference answer")):
        evaluate_run(run, recipe=validate_recipe(raw), echo=lambda m: None)
    with pytest.raises(EvalError, match="finetune merge"):
        evaluate_run(run, model="merged", echo=lambda m: None)


def test_eval_cli_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    res = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code == 2
    assert "not a run directory" in res.output and "Traceback" not in res.output


def test_lm_eval_hub_dataset_unreachable_is_one_clear_error(tmp_path):
    """A task whose dataset lives on the hub fails before any model loads, saying what to do."""
    from finetune.evaluate.lm_eval_bridge import check_tasks

    (tmp_path / "hub_task.yaml").write_text(yaml.safe_dump(
        {"task": "ft_hub", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test",
         "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices.text}}",
         "doc_to_target": 0, "metric_list": [{"metric": "acc"}]}))
    task = EvalTask(name="arc", kind="lm_eval", lm_eval_tasks=["ft_hub"], include_path=str(tmp_path))
    with pytest.raises(EvalError, match="not reachable.*include_path"):  # the tests run with HF_DATASETS_OFFLINE=1
        check_tasks(task)


@pytest.mark.slow  # indexes every task lm-eval ships (seconds)
def test_lm_eval_unknown_task_name_suggests_the_close_one():
    from finetune.evaluate.lm_eval_bridge import check_tasks

    with pytest.raises(EvalError, match="unknown lm-eval task 'arc_eazy'.*arc_easy"):
        check_tasks(EvalTask(name="arc", kind="lm_eval", lm_eval_tasks=["arc_eazy"]))
    with pytest.raises(EvalError, match="not reachable"):
        check_tasks(EvalTask(name="arc", kind="lm_eval", lm_eval_tasks=["arc_easy"]))


def test_stream_reply_sends_text_while_generating(trained_run):
    """generate/chat print each piece as soon as it is final: the callback runs during generation, more than
    once, and the pieces add up to the reply."""
    from finetune.data import prompt_ids
    from finetune.evaluate.generation import stream_reply
    from finetune.evaluate.loading import as_model, load_tuned, open_run

    ctx = open_run(trained_run)
    model = load_tuned(ctx)
    ids = prompt_ids([{"role": "user", "content": "what is red"}], ctx.tok, ctx.template)
    calls = []
    # Count decoding steps, so each piece knows when it arrived.
    model.get_base_model().register_forward_pre_hook(lambda *a: calls.append("step"))
    pieces = []
    with as_model(model, "base"):  # the untuned tiny model rambles: many words, no end token within 16
        gen = stream_reply(model, ctx.tok, ids, [], 16, lambda t: pieces.append((t, len(calls))))
    assert len(pieces) > 1
    assert pieces[0][1] < len(calls), "the first piece arrived only after generation had finished"
    assert "".join(t for t, _ in pieces).strip() == gen.text.strip()


def test_chat_cli_keeps_history_and_reset_clears_it(trained_run):
    from typer.testing import CliRunner

    from finetune.cli import app

    runner = CliRunner()
    one = runner.invoke(app, ["generate", str(trained_run), "--prompt", "what is red", "--max-new-tokens", "8"])
    assert one.exit_code == 0, one.output
    chat = runner.invoke(app, ["chat", str(trained_run), "--max-new-tokens", "8"],
                         input="what is red\n/reset\nwhat is red\n/exit\n")
    assert chat.exit_code == 0 and "Traceback" not in chat.output, chat.output
    # Each reply follows the "> " prompt(s) on its line (/reset prints a prompt and no reply).
    replies = [r for r in (re.sub(r"^(> )+", "", line) for line in chat.stdout.splitlines()) if r.strip()]
    expected = one.stdout.splitlines()[0]
    # After /reset the same question gets the same greedy answer as a fresh one-shot generate.
    assert expected.strip() and replies[0] == replies[-1] == expected, chat.stdout
