"""lm-evaluation-harness tasks on our models: the already-loaded model object is handed to lm-eval's HFLM,
so the base is the same 4-bit object with the adapter switched off and the tuned model is the adapter on
it (or the merged model). Local task YAMLs come from `include_path`; hub tasks need the hub.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math

from finetune.evaluate.scoring import TaskRun
from finetune.evaluate.tasks import EvalError

log = logging.getLogger("finetune")


def _manager(task):
    if task.include_path:
        local = _cached_manager(task.include_path, False)
        if all(name in local.all_tasks for name in task.lm_eval_tasks):
            return local  # every task is local: skip indexing the hundreds lm-eval ships (seconds)
    return _cached_manager(task.include_path, True)


@functools.lru_cache(maxsize=8)
def _cached_manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def check_tasks(task) -> None:
    """Fail before any model loads: unknown task names, or datasets that cannot be reached.

    This runs in a child process (finetune.isolate): lm-eval's task index and its dataset loading run native
    code (pyarrow, datasets) on files we did not write, and a crash there becomes one line naming the task
    and lm-eval's version instead of the end of the evaluation. The scoring itself (lm_eval_scores) stays in
    this process: it runs on the model object already loaded here (4-bit, possibly on a GPU), which a child
    could only get by loading base and adapter again (twice the GPU memory; fork is unsafe once CUDA or the
    OpenMP pool is up), and its native code is the same torch forward our own scorers run in this process.
    """
    from finetune import isolate

    isolate.call(_check_tasks_here, task, runtime="lm-eval", tag="lm-eval",
                 what=f"loading lm-eval task(s) {', '.join(task.lm_eval_tasks)} of eval task {task.name}")


def _check_tasks_here(task) -> None:
    tm = _manager(task)
    known = set(tm.all_tasks)
    for name in task.lm_eval_tasks:
        if name not in known and not tm.match_tasks([name]):
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (searched lm-eval's tasks and {task.include_path})" if task.include_path else ""
            raise EvalError(f"eval task {task.name}: unknown lm-eval task {name!r}{where}{hint}")
    _load(tm, task)


def _load(tm, task):
    try:
        return tm.load(list(task.lm_eval_tasks))
    except ConnectionError as e:
        raise EvalError(
            f"eval task {task.name}: lm-eval task(s) {task.lm_eval_tasks} need a dataset from the Hugging Face Hub, "
            f"which is not reachable ({str(e).splitlines()[0]}). Run where the hub is reachable, or copy the data "
            "locally and write a task YAML with `dataset_path: json` in a directory given as include_path") from None


def _number(x):
    if isinstance(x, bool):
        return float(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def lm_eval_scores(model, tok, task, batch_size: int, limit: int | None) -> dict[str, TaskRun]:
    """One TaskRun per lm-eval (sub)task, keyed by its name; metrics are named `metric` or `metric[filter]`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(task.lm_eval_tasks), task_manager=_manager(task),
                                      limit=limit, log_samples=True, bootstrap_iters=0,
                                      apply_chat_template=task.apply_chat_template)
    except ConnectionError as e:
        raise EvalError(f"eval task {task.name}: lm-eval could not reach the hub ({str(e).splitlines()[0]})") from None
    out = {}
    for sub, metrics in res["results"].items():
        samples = sorted(res.get("samples", {}).get(sub, []), key=lambda s: s["doc_id"])
        run = TaskRun()
        for key, val in metrics.items():
            if "," not in key or "_stderr" in key.split(",")[0] or _number(val) is None:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}[{filt}]"
            run.reported[name] = float(val)
            per = [_number(s.get(metric)) for s in samples if s.get("filter", "none") == filt]
            # Per-document values give a confidence interval only when their mean is lm-eval's number
            # (metrics aggregated otherwise, e.g. corpus BLEU, get no interval rather than a wrong one).
            if per and None not in per and abs(sum(per) / len(per) - float(val)) < 1e-6:
                run.values[name] = per
        seen = set()
        for s in samples:
            if s["doc_id"] in seen:  # one line per document, whatever the number of filters
                continue
            seen.add(s["doc_id"])
            run.outputs.append({"doc_id": s["doc_id"], "prompt": _prompt_of(s), "reference": str(s.get("target")),
                                **_response(s.get("filtered_resps"))})
        out[sub] = run
    return out


def _prompt_of(sample: dict) -> str:
    args = sample.get("arguments")
    try:
        first = args[0] if isinstance(args, list) else next(iter(args.values()))
        return str(first[0] if isinstance(first, (list, tuple)) else first)
    except (StopIteration, TypeError, IndexError, KeyError, AttributeError):
        return ""


def _response(resp) -> dict:
    """A generation's text, or for log-likelihood requests the index of the most likely choice."""
    if isinstance(resp, list) and resp and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in resp):
        lls = [float(r[0]) for r in resp]
        return {"text": str(max(range(len(lls)), key=lls.__getitem__)), "loglikelihoods": lls}
    if isinstance(resp, list) and len(resp) == 1:
        return {"text": str(resp[0])}
    return {"text": str(resp)}
