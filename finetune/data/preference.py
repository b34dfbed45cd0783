"""Preference data (train.method dpo | orpo | simpo | kto): rows -> prompt + replies -> token ids, for TRL.

Formats (column mapping as for SFT, data.train[].columns):
    preference            {"prompt": str, "chosen": str, "rejected": str}
    preference_messages   {"chosen": [turns], "rejected": [turns]}: the same prompt turns, then one assistant reply
                          each (UltraFeedback-binarized); an optional "prompt" column is ignored
    kto                   {"prompt": str, "completion": str, "label": true | false}, unpaired

The prompt is rendered once by the run's template (data_templates/*.jinja); each reply is the span the template
marks as the assistant's (its `{% generation %}` block, end-of-turn token included), so the loss is on the replies
only and the end token is supervised in chosen and rejected alike. Tokenising prompt and reply separately
(encode._segmented_ids) makes the prompt ids identical for both replies by construction; TRL receives
`prompt_ids`, `chosen_ids`, `rejected_ids` (`completion_ids`, `label` for kto) and tokenises nothing itself.

Length rule (stated once, counted in the report): a prompt longer than preference.max_prompt_length (default
data.max_length // 2) keeps its last tokens; then each reply keeps its first data.max_length - prompt tokens.
With data.too_long: drop such a row is dropped instead, with error it is a file:line error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass

from finetune.data.encode import render_ids_and_mask
from finetune.data.formats import _apply_columns, _conversation, _field_name, _string, columns_problem
from finetune.data.readers import DataError, RowError, read_records
from finetune.recipe import DataSource
from finetune.templates import ChatTemplate

log = logging.getLogger("finetune")


@dataclass
class PreferenceExample:
    loc: str
    """`file:line` of the row."""
    prompt: list[dict]
    """The conversation before the reply (ends with a user turn)."""
    chosen: str
    """The preferred reply (kto: the completion)."""
    rejected: str | None = None
    """The worse reply (None for kto)."""
    label: bool | None = None
    """kto: whether the completion is desirable."""

    @property
    def messages(self) -> list[dict]:
        """prompt + chosen: what generation and held-out-loss tasks read (held_out.jsonl), as for an SFT run."""
        return self.prompt + [{"role": "assistant", "content": self.chosen}]

    def held_out_row(self) -> dict:
        return {"loc": self.loc, "messages": self.messages, "text": None, "prompt": self.prompt,
                "chosen": self.chosen, "rejected": self.rejected, "label": self.label}


# ---------------------------------------------------------------------------------------------
# rows -> PreferenceExample


def to_preference_example(loc: str, record, src: DataSource, system_prompt: str | None = None) -> PreferenceExample:
    if not isinstance(record, dict):
        raise RowError(loc, f"expected a JSON object for format {src.format}, got {type(record).__name__}")
    rec = _apply_columns(record, src, loc)
    if src.format == "preference_messages":
        ex = _from_messages(loc, rec, src)
    else:
        prompt = [{"role": "user", "content": _string(rec, "prompt", loc, src, nonempty=True)}]
        if src.format == "kto":
            ex = PreferenceExample(loc, prompt, _string(rec, "completion", loc, src, nonempty=True),
                                   label=_label(rec, loc, src))
        else:
            ex = PreferenceExample(loc, prompt, _string(rec, "chosen", loc, src, nonempty=True),
                                   _string(rec, "rejected", loc, src, nonempty=True))
    if ex.rejected is not None and ex.chosen.strip() == ex.rejected.strip():
        raise RowError(loc, f"{_field_name('chosen', src)} and {_field_name('rejected', src)} replies are identical "
                            "(nothing to prefer; fix or remove the row)")
    if system_prompt and ex.prompt[0]["role"] != "system":
        ex.prompt.insert(0, {"role": "system", "content": system_prompt})
    return ex


def _from_messages(loc: str, rec: dict, src: DataSource) -> PreferenceExample:
    convs = {}
    for key in ("chosen", "rejected"):
        turns = _conversation(rec, key, loc, src, role_key="role", content_key="content", roles=None)
        if turns[-1]["role"] != "assistant":
            raise RowError(loc, f"{_field_name(key, src)}: the last turn must be the assistant's reply "
                                f"(got {turns[-1]['role']!r})")
        if len(turns) < 2:
            raise RowError(loc, f"{_field_name(key, src)}: no prompt turn before the reply")
        convs[key] = turns
    c, r = convs["chosen"][:-1], convs["rejected"][:-1]
    if c != r:
        at = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        raise RowError(loc, f"the prompt differs between chosen and rejected (turn {at}); both lists must share "
                            "every turn before the final reply")
    return PreferenceExample(loc, c, convs["chosen"][-1]["content"], convs["rejected"][-1]["content"])


def _label(rec: dict, loc: str, src: DataSource) -> bool:
    v = rec.get("label")
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")  # csv cells are strings
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    if v is None:
        raise RowError(loc, f"missing field {_field_name('label', src)!r} for format kto (true or false)")
    raise RowError(loc, f"field {_field_name('label', src)!r} must be true or false, got {v!r}")


def load_preference_examples(sources: list[DataSource], cfg, seed: int, report: dict) -> list[PreferenceExample]:
    """Every row of every source, checked; with on_bad_row: skip the bad ones are counted (first five named)."""
    out: list[PreferenceExample] = []
    skipped = report.setdefault("skipped_rows", {"count": 0, "first": []})
    per_source = report.setdefault("rows_per_source", {})
    for src in sources:
        rows = []
        if problem := columns_problem(src, set()):
            raise DataError(f"{src.path}: {problem}")
        for loc, rec in read_records(src):
            try:
                if isinstance(rec, RowError):
                    raise rec
                rows.append(to_preference_example(loc, rec, src, cfg.system_prompt))
            except RowError as e:
                if cfg.on_bad_row != "skip":
                    raise
                skipped["count"] += 1
                if len(skipped["first"]) < 5:
                    skipped["first"].append(str(e))
        if src.max_samples is not None and len(rows) > src.max_samples:
            keep = sorted(random.Random(seed).sample(range(len(rows)), src.max_samples))
            rows = [rows[i] for i in keep]
        per_source[src.path] = len(rows)
        if not rows:
            raise DataError(f"{src.path}: no usable rows" + (f" ({skipped['count']} skipped as bad)" if skipped["count"] else ""))
        out.extend(rows)
    if skipped["count"]:
        log.warning("skipped %d bad rows (data.on_bad_row: skip); first: %s", skipped["count"], "; ".join(skipped["first"]))
    return out


# ---------------------------------------------------------------------------------------------
# PreferenceExample -> ids


def reply_ids(prompt: list[dict], reply: str, tok, template: ChatTemplate) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the reply is the template's supervised span of the final assistant turn (its end
    token included); anything the template renders after it (e.g. ChatML's newline) is not part of the reply."""
    ids, mask = render_ids_and_mask(prompt + [{"role": "assistant", "content": reply}], tok, template)
    last = max(i for i, m in enumerate(mask) if m)
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:last + 1]


def encode_preference(ex: PreferenceExample, tok, template: ChatTemplate, max_length: int,
                      max_prompt_length: int) -> tuple[dict, dict]:
    """TRL's columns for one row, and what the length rule did to it ({"prompt_truncated", "reply_truncated"})."""
    prompt, chosen = reply_ids(ex.prompt, ex.chosen, tok, template)
    replies = {"chosen_ids": chosen}
    if ex.rejected is not None:
        prompt_r, rejected = reply_ids(ex.prompt, ex.rejected, tok, template)
        if prompt_r != prompt:  # cannot happen with segmented tokenisation, unless the template renders replies into the prompt
            raise RowError(ex.loc, f"template {template.name} renders the prompt differently before chosen and "
                                   "rejected; use a template from data_templates/")
        replies["rejected_ids"] = rejected
    cut = {"prompt_truncated": len(prompt) > max_prompt_length, "reply_truncated": False}
    prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    for key, ids in replies.items():
        if len(ids) > budget:
            cut["reply_truncated"] = True
            replies[key] = ids[:budget]
    if ex.rejected is None:
        return {"prompt_ids": prompt, "completion_ids": replies["chosen_ids"], "label": bool(ex.label)}, cut
    return {"prompt_ids": prompt, **replies}, cut


def encode_all_preference(examples: list[PreferenceExample], tok, template, cfg, max_prompt_length: int):
    rows, counts = [], {"prompt_truncated": 0, "reply_truncated": 0}
    dropped: list[str] = []
    for ex in examples:
        row, cut = encode_preference(ex, tok, template, cfg.max_length, max_prompt_length)
        if cut["prompt_truncated"] or cut["reply_truncated"]:
            if cfg.too_long == "error":
                raise RowError(ex.loc, f"pair is longer than data.max_length={cfg.max_length} tokens (or its prompt "
                                       f"than preference.max_prompt_length={max_prompt_length}); raise them, or set "
                                       "data.too_long: truncate or drop")
            if cfg.too_long == "drop":
                dropped.append(f"{ex.loc}: longer than max_length")
                continue
        for key in counts:
            counts[key] += int(cut[key])
        rows.append(row)
    if dropped:
        log.warning("dropped %d rows (too long); first: %s", len(dropped), "; ".join(dropped[:3]))
    if not rows:
        raise DataError(f"no training rows left: {len(dropped)} were dropped ({'; '.join(dropped[:3])})")
    return rows, {"truncated": counts["prompt_truncated"] + counts["reply_truncated"], "truncation": counts,
                  "dropped": {"count": len(dropped), "first": dropped[:5]}}


def to_dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------
# the pipeline


def max_prompt_length(recipe) -> int:
    pref = recipe.preference
    return (pref.max_prompt_length if pref and pref.max_prompt_length else recipe.data.max_length // 2)


def prepare_preference(recipe, tok, template: ChatTemplate, use_cache: bool = True):
    """Sources -> checked rows -> held-out split -> TRL's id columns + a report (cached by fingerprint)."""
    from finetune.data import cache as data_cache
    from finetune.data.prepare import Prepared, data_hashes

    key = ""
    if use_cache:
        base = data_cache.fingerprint(recipe, tok, template, data_hashes(recipe))
        extra = json.dumps({"method": recipe.train.method, "max_prompt_length": max_prompt_length(recipe)})
        key = base and hashlib.sha256((base + extra).encode()).hexdigest()[:32]
    return data_cache.cached(key, lambda: _prepare_uncached(recipe, tok, template), PreferenceExample, Prepared)


def _prepare_uncached(recipe, tok, template):
    from finetune.data.prepare import Prepared

    cfg, report = recipe.data, {}
    examples = load_preference_examples(cfg.train, cfg, recipe.train.seed, report)
    if cfg.eval:
        held = load_preference_examples(cfg.eval, cfg, recipe.train.seed, {"skipped_rows": report["skipped_rows"]})
        train = examples
    else:
        train, held = split_held_out(examples, cfg.held_out, recipe.train.seed)
    limit = max_prompt_length(recipe)
    rows, counts = encode_all_preference(train, tok, template, cfg, limit)
    report.update(counts)
    report["method"] = recipe.train.method
    report["length_rule"] = (f"prompt keeps its last {limit} tokens; each reply keeps its first "
                             f"{cfg.max_length} - prompt tokens")
    report["rows"] = {"train": len(rows), "held_out": len(held)}
    if recipe.train.method == "kto":
        report["labels"] = {"desirable": sum(r["label"] for r in rows), "undesirable": sum(not r["label"] for r in rows)}
    report.update(length_stats(rows))
    report["examples"] = [render_pair(e, tok, template) for e in train[:2]]
    return Prepared(to_dataset(rows), held, report)


def split_held_out(examples: list[PreferenceExample], held_out: float, seed: int):
    """Seeded split over distinct rows; a duplicate of a held-out row is in neither set."""
    if not held_out:
        return examples, []
    key = [json.dumps([e.prompt, e.chosen, e.rejected, e.label]) for e in examples]
    unique = list(dict.fromkeys(key))
    if len(unique) < 2:
        raise DataError(f"data.held_out: {held_out:g}: the held-out split took every row ({len(unique)} distinct); "
                        "add rows, or set data.held_out: 0")
    n = int(round(held_out * len(unique))) if held_out < 1 else int(held_out)
    chosen = set(random.Random(seed).sample(unique, max(1, min(n, len(unique) - 1))))
    train, held, seen = [], [], set()
    for ex, k in zip(examples, key):
        if k not in chosen:
            train.append(ex)
        elif k not in seen:
            seen.add(k)
            held.append(ex)
    return train, held


def length_stats(rows: list[dict]) -> dict:
    import numpy as np

    def pct(values):
        return {f"p{q}": int(np.percentile(values, q)) for q in (5, 50, 95, 100)} if values else {}

    parts = {"prompt": [len(r["prompt_ids"]) for r in rows]}
    if "rejected_ids" in rows[0]:
        parts["chosen"] = [len(r["chosen_ids"]) for r in rows]
        parts["rejected"] = [len(r["rejected_ids"]) for r in rows]
        total = sum(2 * p + c + r for p, c, r in zip(parts["prompt"], parts["chosen"], parts["rejected"]))
        supervised = sum(parts["chosen"]) + sum(parts["rejected"])
    else:
        parts["completion"] = [len(r["completion_ids"]) for r in rows]
        total = sum(parts["prompt"]) + sum(parts["completion"])
        supervised = sum(parts["completion"])
    return {"tokens": total, "supervised_tokens": supervised, "supervised_fraction": supervised / max(1, total),
            "length_percentiles_by_part": {k: pct(v) for k, v in parts.items()},
            "length_percentiles": pct([p + max(len(r.get("chosen_ids", [])), len(r.get("rejected_ids", [])),
                                               len(r.get("completion_ids", []))) for p, r in zip(parts["prompt"], rows)])}


def render_pair(ex: PreferenceExample, tok, template: ChatTemplate) -> dict:
    """The prompt once, then each reply with its supervised span, as segments for `finetune data`."""
    prompt, chosen = reply_ids(ex.prompt, ex.chosen, tok, template)
    segments = [[tok.decode(prompt), False], [tok.decode(chosen), True]]
    if ex.rejected is not None:
        _, rejected = reply_ids(ex.prompt, ex.rejected, tok, template)
        segments = [[tok.decode(prompt), False], ["\n  chosen: ", False], [tok.decode(chosen), True],
                    ["\n  rejected: ", False], [tok.decode(rejected), True]]
    elif ex.label is not None:
        segments.append([f"\n  label: {'desirable' if ex.label else 'undesirable'}", False])
    return {"loc": ex.loc, "segments": segments}


def write_held_out(path, held: list[PreferenceExample]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in held:
            f.write(json.dumps(ex.held_out_row(), ensure_ascii=False) + "\n")
