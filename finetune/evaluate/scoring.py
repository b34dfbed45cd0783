"""Run one task on one model and score it example by example.

Each function returns a TaskRun: per-example values for every metric (plus weights where the aggregate is
token-weighted) and the model's outputs, so that report.py can pair base and tuned example by example.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.evaluate import metrics as M
from finetune.evaluate.generation import greedy_generate, masked_nll
from finetune.evaluate.tasks import EvalError, Item


@dataclass
class TaskRun:
    values: dict[str, list[float]] = field(default_factory=dict)
    """metric -> one value per example (same example order for every model)."""
    weights: dict[str, list[float]] = field(default_factory=dict)
    """metric -> per-example weights (token counts for loss and perplexity)."""
    outputs: list[dict] = field(default_factory=list)
    """Per example: what the model produced (text, stopped, chosen answer, scores)."""
    reported: dict[str, float] = field(default_factory=dict)
    """Values an outside harness reported itself (lm-eval); they take precedence over our mean."""


def _prompts(ctx, items: list[Item]) -> list[list[int]]:
    from finetune.data import prompt_ids

    return [prompt_ids(it.prompt, ctx.tok, ctx.template) for it in items]


def generation_scores(ctx, model, task, items: list[Item], batch_size: int, label: str) -> TaskRun:
    """Greedy replies with the task's budget, scored with its metrics, plus whether each reply stopped."""
    gens = greedy_generate(model, ctx.tok, _prompts(ctx, items), ctx.stops, task.max_new_tokens, batch_size,
                           desc=label)
    out = TaskRun()
    for name in task.metrics:
        try:
            out.values[name] = [M.score(name, g.text, it.references, task.normalize, task.pattern)
                                for g, it in zip(gens, items)]
        except ValueError as e:
            raise EvalError(f"eval task {task.name}: {e}") from None
    out.values["stop_rate"] = [float(g.stopped) for g in gens]
    if len(ctx.stops) > 1:
        # The template's end token is not EOS (e.g. one data.add_template_tokens added): EOS stops a reply too, so
        # stop_rate alone cannot tell whether the model learned to end its turns with the template's token.
        out.values["end_token_rate"] = [float(g.stop_id == ctx.stops[0]) for g in gens]
    for k, g in enumerate(gens):
        stop = ctx.tok.convert_ids_to_tokens(g.stop_id) if g.stop_id is not None else None
        out.outputs.append({"text": g.text, "stopped": g.stopped, "stop_token": stop, "tokens": g.n_tokens,
                            "scores": {m: out.values[m][k] for m in task.metrics}})
    return out


def held_out_scores(ctx, model, task, items: list[Item], batch_size: int, label: str) -> TaskRun:
    """Teacher-forced loss/perplexity on the reference replies (labels exactly as training built them),
    then the generation metrics on the rows that have a prompt."""
    from finetune.data import Example, encode

    seqs = []
    for it in items:
        ex = Example(it.id, it.full, text=it.text)
        enc = encode(ex, ctx.tok, ctx.template, ctx.recipe.data.max_length, ctx.recipe.data.train_on_prompt)
        seqs.append((enc.input_ids, enc.labels))
    nll = masked_nll(model, seqs, ctx.tok.pad_token_id, batch_size, desc=f"{label} loss")
    scored = [(s, n) for s, n in nll if n > 0]
    out = TaskRun()
    out.values["loss"] = [s / n for s, n in scored]
    out.weights["loss"] = [float(n) for _, n in scored]
    out.values["perplexity"] = out.values["loss"]  # exp of the token-weighted mean: see report.TRANSFORMS
    out.weights["perplexity"] = out.weights["loss"]
    prompted = [k for k, it in enumerate(items) if it.prompt is not None]
    if prompted:
        gen = generation_scores(ctx, model, task, [items[k] for k in prompted], batch_size, label)
        out.values.update(gen.values)
        outputs = dict(zip(prompted, gen.outputs))
        # Aligned with the rows, so predictions line up; raw-text rows have no reply to show.
        out.outputs = [outputs.get(k, {"text": None}) for k in range(len(items))]
    return out


def choice_scores(ctx, model, task, items: list[Item], batch_size: int, label: str) -> TaskRun:
    """lm-eval's multiple-choice scoring: the log-likelihood of each choice as the reply to the prompt;
    acc picks the highest, acc_norm the highest per character of the choice."""
    prompts = _prompts(ctx, items)
    seqs, owners = [], []
    for k, (it, p) in enumerate(zip(items, prompts)):
        for choice in it.choices:
            cont = ctx.tok(choice, add_special_tokens=False)["input_ids"]
            seqs.append((p + cont, [-100] * len(p) + cont))
            owners.append(k)
    nll = masked_nll(model, seqs, ctx.tok.pad_token_id, batch_size, desc=label)
    out = TaskRun(values={"acc": [], "acc_norm": []})
    pos = 0
    for it in items:
        lls = [-nll[pos + j][0] for j in range(len(it.choices))]
        pos += len(it.choices)
        raw = max(range(len(lls)), key=lambda j: lls[j])
        norm = max(range(len(lls)), key=lambda j: lls[j] / len(it.choices[j]))
        out.values["acc"].append(float(raw == it.answer))
        out.values["acc_norm"].append(float(norm == it.answer))
        out.outputs.append({"text": it.choices[raw], "loglikelihoods": lls, "choice": raw, "choice_norm": norm})
    return out


def preference_scores(ctx, model, task, items: list[Item], batch_size: int, label: str) -> TaskRun:
    """On pairs: is the chosen reply more likely than the rejected one, per token? Each reply is scored as training
    scores it (the template's reply span, end-of-turn token included, after the prompt rendered once), so the
    lengths the mean is taken over are token counts. logp_margin: mean per-token log-likelihood chosen - rejected."""
    from finetune.data.preference import reply_ids

    seqs = []
    for it in items:
        for reply in it.choices:
            prompt, ids = reply_ids(it.prompt, reply, ctx.tok, ctx.template)
            seqs.append((prompt + ids, [-100] * len(prompt) + ids))
    nll = masked_nll(model, seqs, ctx.tok.pad_token_id, batch_size, desc=label)
    out = TaskRun(values={"preference_acc": [], "logp_margin": []})
    for k in range(len(items)):
        (nc, tc), (nr, tr) = nll[2 * k], nll[2 * k + 1]
        chosen, rejected = -nc / max(tc, 1), -nr / max(tr, 1)
        out.values["preference_acc"].append(float(chosen > rejected))
        out.values["logp_margin"].append(chosen - rejected)
        out.outputs.append({"text": None, "logp_per_token": {"chosen": chosen, "rejected": rejected}})
    return out


SCORERS = {"held_out": held_out_scores, "generate": generation_scores, "multiple_choice": choice_scores,
           "preference": preference_scores}
