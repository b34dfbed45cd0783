"""Evaluation: held-out tasks, generation metrics, multiple choice and lm-eval, base vs fine-tuned.

    tasks.py          task rows (held_out.jsonl, JSONL files) -> prompts, references, choices
    generation.py     batched greedy generation, teacher-forced log-likelihoods, streaming
    metrics.py        per-example metrics, paired bootstrap confidence intervals
    scoring.py        one task on one model -> per-example scores
    lm_eval_bridge.py lm-evaluation-harness on the same model objects
    loading.py        open a run directory: recipe, tokenizer, template, base + adapter, merged
    report.py         results.json, predictions/, table.md, report.md
    runner.py         `finetune eval`: all of the above in order
"""

from finetune.evaluate.runner import eval_complete, evaluate_run
from finetune.evaluate.tasks import EvalError

__all__ = ["EvalError", "eval_complete", "evaluate_run"]
