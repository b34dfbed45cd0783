"""How closely two models' greedy continuations agree: merge's fidelity report and export's ladder both use it.

A leaf (imports nothing of ours), so the merge and export stages share it without importing each other.
"""

from __future__ import annotations


def generation_agreement(ref: list[list[int]], new: list[list[int]]) -> dict:
    """Identical continuations, and tokens agreeing up to the first divergence (after it the two continue from
    different contexts, so later tokens say nothing about the weights)."""
    same = sum(a == b for a, b in zip(ref, new))
    matched = total = 0
    for a, b in zip(ref, new):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        matched += k
        total += max(len(a), len(b))
    return {"identical": same, "prompts": len(ref), "identical_fraction": same / max(len(ref), 1),
            "token_agreement": matched / max(total, 1)}
