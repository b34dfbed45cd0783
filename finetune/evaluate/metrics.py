"""Per-example metrics and the paired bootstrap used for every confidence interval.

Every metric scores one prediction against its references (the best reference wins) and returns a number
in [0, 1], so a task's value is the mean over examples and base-vs-tuned deltas can be bootstrapped
example by example. String metrics come from maintained packages (sacrebleu for chrF, rouge-score for
ROUGE-L); only normalisation and JSON comparison are ours.
"""

from __future__ import annotations

import json
import math
import re
import string
from typing import Callable, Sequence

import numpy as np

GENERATION_METRICS = ("exact_match", "contains", "regex", "json_match", "rouge_l", "chrf")
LOWER_IS_BETTER = {"loss", "perplexity"}

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str, options: Sequence[str]) -> str:
    """Apply the recipe's `normalize` options in a fixed order (SQuAD's order: lower, punctuation, articles,
    whitespace), so the result does not depend on how the user listed them."""
    if "lower" in options:
        text = text.lower()
    if "punctuation" in options:
        text = text.translate(_PUNCT)
    if "articles" in options:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in options:
        text = " ".join(text.split())
    if "strip" in options:
        text = text.strip()
    return text


def exact_match(pred: str, refs: Sequence[str], options: Sequence[str] = ("strip",)) -> float:
    p = normalize(pred, options)
    return float(any(p == normalize(r, options) for r in refs))


def contains(pred: str, refs: Sequence[str], options: Sequence[str] = ("strip",)) -> float:
    p = normalize(pred, options)
    return float(any(normalize(r, options) in p for r in refs))


def regex(pred: str, refs: Sequence[str], pattern: str, options: Sequence[str] = ("strip",)) -> float:
    """Without references: 1 if the pattern matches the output (a format check). With references: the first
    match (group 1 if the pattern has a group) must equal a reference after normalisation (answer extraction)."""
    m = re.search(pattern, pred)
    if m is None:
        return 0.0
    if not refs:
        return 1.0
    found = m.group(1) if m.re.groups else m.group(0)
    return exact_match(found or "", refs, options)


def _parse_json(text: str):
    try:
        return True, json.loads(text.strip())
    except (ValueError, TypeError):
        return False, None


def _same(a, b) -> bool:
    # 32 == 32.0 in JSON; True must not equal 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def json_match(pred: str, refs: Sequence[str]) -> float:
    """The whole output must parse as JSON (strict: no prose, no code fences). For object references the
    score is the fraction of fields, over the union of both sides' keys, whose values are equal, so missing
    and invented fields both cost; other references must be equal as a whole."""
    ok, got = _parse_json(pred)
    if not ok:
        return 0.0
    best = 0.0
    for ref in refs:
        ok_ref, want = _parse_json(ref)
        if not ok_ref:
            raise ValueError(f"reference is not valid JSON: {ref[:60]!r} (json_match needs JSON references)")
        if isinstance(want, dict) and isinstance(got, dict):
            keys = set(want) | set(got)
            score = sum(k in want and k in got and _same(want[k], got[k]) for k in keys) / max(1, len(keys))
        else:
            score = float(_same(want, got))
        best = max(best, score)
    return best


class _WordTokenizer:
    """rouge-score's default tokenizer drops every non-ASCII character (a Japanese answer scores 0);
    this one keeps Unicode words and is identical on ASCII text (lower-case alphanumeric runs)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


_ROUGE = None


def rouge_l(pred: str, refs: Sequence[str]) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return max(_ROUGE.score(r, pred)["rougeL"].fmeasure for r in refs)


def chrf(pred: str, refs: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(pred, list(refs)).score / 100.0


def score(metric: str, pred: str, refs: Sequence[str], options: Sequence[str] = ("strip",),
          pattern: str | None = None) -> float:
    """One generation metric by name (the names that eval.tasks[].metrics accepts)."""
    if metric == "exact_match":
        return exact_match(pred, refs, options)
    if metric == "contains":
        return contains(pred, refs, options)
    if metric == "regex":
        return regex(pred, refs, pattern or "", options)
    if metric == "json_match":
        return json_match(pred, refs)
    if metric == "rouge_l":
        return rouge_l(pred, refs)
    if metric == "chrf":
        return chrf(pred, refs)
    raise ValueError(f"unknown metric {metric!r}; choose from {GENERATION_METRICS}")


# ---------------------------------------------------------------------------------------------
# Aggregation and confidence intervals


def aggregate(values: Sequence[float], weights: Sequence[float] | None = None,
              transform: Callable[[float], float] | None = None) -> float:
    """The task-level value: a (weighted) mean of per-example values, optionally transformed
    (perplexity = exp of the token-weighted mean loss)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    mean = float((v * w).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return transform(mean) if transform else mean


def _resampled(values: np.ndarray, weights: np.ndarray, idx: np.ndarray, transform) -> np.ndarray:
    num = (values[idx] * weights[idx]).sum(axis=1)
    den = weights[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = num / den
    return np.vectorize(transform)(means) if transform else means


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, n: int = 1000,
                 seed: int = 0, transform=None) -> tuple[float, float]:
    """95% percentile bootstrap interval of `aggregate(values, weights, transform)`."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))
    stats = _resampled(v, w, idx, transform)
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def paired_bootstrap_ci(base: Sequence[float], tuned: Sequence[float], base_weights=None, tuned_weights=None,
                        n: int = 1000, seed: int = 0, transform=None) -> tuple[float, float]:
    """95% interval of aggregate(tuned) - aggregate(base), resampling the *same* examples for both models
    (pairing removes the example-difficulty variance that two independent intervals would double count)."""
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if len(b) != len(t):
        raise ValueError(f"paired bootstrap needs the same examples for both models ({len(b)} vs {len(t)})")
    if len(b) == 0:
        return (float("nan"), float("nan"))
    bw = np.ones_like(b) if base_weights is None else np.asarray(base_weights, dtype=float)
    tw = np.ones_like(t) if tuned_weights is None else np.asarray(tuned_weights, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(b), size=(n, len(b)))
    deltas = _resampled(t, tw, idx, transform) - _resampled(b, bw, idx, transform)
    lo, hi = np.nanpercentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))  # exp overflows float64 past ~709
