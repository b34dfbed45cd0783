"""The whole pipeline: sources -> examples -> held-out split -> encoded dataset + report (cached)."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.rundir import file_sha256  # one hashing helper for the whole package
from finetune.data.encode import Encoded, encode
from finetune.data.formats import Example, check_turn_order, columns_problem, to_example
from finetune.data.readers import DataError, RowError, read_records, source_files
from finetune.recipe import DataSource, looks_local
from finetune.templates import ChatTemplate

log = logging.getLogger("finetune")


@dataclass
class Prepared:
    train: Any
    """datasets.Dataset with input_ids and labels (what SFTTrainer receives)."""
    held_out: list[Example]
    report: dict = field(default_factory=dict)


def load_examples(sources: list[DataSource], data_cfg, template: ChatTemplate, seed: int, report: dict) -> list[Example]:
    """Read and validate every row of every source. With on_bad_row=skip, bad rows are counted, not fatal."""
    out: list[Example] = []
    skipped = report.setdefault("skipped_rows", {"count": 0, "first": []})
    per_source = report.setdefault("rows_per_source", {})
    for src in sources:
        rows: list[Example] = []
        columns_seen: set = set()
        if problem := columns_problem(src, columns_seen):
            raise DataError(f"{src.path}: {problem}")
        for loc, rec in read_records(src):
            if src.columns and isinstance(rec, dict):
                columns_seen.update(rec)
            try:
                if isinstance(rec, RowError):
                    raise rec
                ex = to_example(loc, rec, src, data_cfg.system_prompt)
                check_turn_order(ex, template)
            except RowError as e:
                if data_cfg.on_bad_row != "skip":
                    raise
                _skip(skipped, e)
                continue
            rows.append(ex)
        if problem := columns_problem(src, columns_seen):
            raise DataError(f"{src.path}: {problem}")
        if src.max_samples is not None and len(rows) > src.max_samples:
            rng = random.Random(seed)
            keep = sorted(rng.sample(range(len(rows)), src.max_samples))
            rows = [rows[i] for i in keep]
        per_source[src.path] = len(rows)
        if not rows:
            raise DataError(f"{src.path}: no usable rows" + (f" ({skipped['count']} skipped as bad)" if skipped["count"] else ""))
        out.extend(_weighted(rows, src.weight, seed) if src.weight else rows)
    if skipped["count"]:
        log.warning("skipped %d bad rows (data.on_bad_row: skip); first: %s", skipped["count"], "; ".join(skipped["first"]))
    return out


def _skip(skipped: dict, e: RowError) -> None:
    skipped["count"] += 1
    if len(skipped["first"]) < 5:
        skipped["first"].append(str(e))


def _weighted(rows: list[Example], weight: float, seed: int) -> list[Example]:
    """weight 2.0 repeats every row twice; 0.5 keeps a seeded half. Fractions round down, never silently to 0."""
    whole, frac = int(weight), weight - int(weight)
    out = rows * whole
    if frac:
        rng = random.Random(seed + 1)
        out += rng.sample(rows, max(1, int(len(rows) * frac)))
    return out


def rendered_text(ex: Example, tok, template: ChatTemplate) -> str:
    if ex.messages is None:
        return ex.text or ""
    return tok.apply_chat_template(ex.messages, chat_template=template.source, tokenize=False)


def split_held_out(examples: list[Example], held_out: float, seed: int, tok, template, report: dict):
    """Seeded split; rows whose rendered text equals a held-out row's are removed from train (and counted)."""
    texts = [rendered_text(e, tok, template) for e in examples]
    dup_within = len(texts) - len(set(texts))
    report["duplicates"] = {"rows_with_identical_rendered_text": dup_within}
    if not held_out:
        return examples, []
    unique = list(dict.fromkeys(texts))
    if len(unique) < 2:
        distinct = f" ({len(unique)} distinct once rendered)" if len(unique) != len(examples) else ""
        raise DataError(f"data.held_out: {held_out:g}: the held-out split took every row: the data has "
                        f"{len(examples)} row{'s' if len(examples) != 1 else ''}{distinct}, and at least one "
                        "held-out and one training row are needed; add rows, or set data.held_out: 0")
    n = int(round(held_out * len(unique))) if held_out < 1 else int(held_out)
    if n >= len(unique):
        log.warning("data.held_out: %g would take all %d distinct rows; holding out %d so one is left to train on",
                    held_out, len(unique), len(unique) - 1)
    n = max(1, min(n, len(unique) - 1))
    rng = random.Random(seed)
    chosen = set(rng.sample(unique, n))
    held, train, seen_held = [], [], set()
    overlap = 0
    for ex, t in zip(examples, texts):
        if t in chosen:
            if t in seen_held:
                overlap += 1  # a duplicate of a held-out row: in neither set
                continue
            seen_held.add(t)
            held.append(ex)
        else:
            train.append(ex)
    report["duplicates"]["removed_from_train_as_held_out_duplicates"] = overlap
    return train, held


def prepare(recipe, tok, template: ChatTemplate, use_cache: bool = True) -> Prepared:
    """Sources -> checked rows -> held-out split -> ids + labels, with a report. Cached by fingerprint."""
    from finetune.data import cache as data_cache

    key = data_cache.fingerprint(recipe, tok, template, data_hashes(recipe)) if use_cache else ""
    return data_cache.cached(key, lambda: _prepare_uncached(recipe, tok, template), Example, Prepared)


def _prepare_uncached(recipe, tok, template: ChatTemplate) -> Prepared:
    cfg = recipe.data
    report: dict = {}
    examples = load_examples(cfg.train, cfg, template, recipe.train.seed, report)
    if cfg.eval:
        train_ex = examples
        held = load_examples(cfg.eval, cfg, template, recipe.train.seed, {"skipped_rows": report["skipped_rows"]})
        report["duplicates"] = {"rows_with_identical_rendered_text": 0}
        held_texts = {rendered_text(e, tok, template) for e in held}
        before = len(train_ex)
        train_ex = [e for e in train_ex if rendered_text(e, tok, template) not in held_texts]
        report["duplicates"]["removed_from_train_as_held_out_duplicates"] = before - len(train_ex)
        if not train_ex:
            raise DataError(f"data.eval: every training row ({before}) also appears in data.eval (same rendered "
                            "text), so none is left to train on; use different files for data.train and data.eval")
    else:
        train_ex, held = split_held_out(examples, cfg.held_out, recipe.train.seed, tok, template, report)
    encoded, counts = encode_all(train_ex, tok, template, cfg)
    report.update(counts)
    report["rows"] = {"train": len(encoded), "held_out": len(held)}
    report["rows_per_split_and_source"] = {
        "train": _count_by_source(train_ex), "held_out": _count_by_source(held)}
    report.update(length_stats(encoded, cfg.max_length, micro_batch=recipe.train.micro_batch_size))
    report["examples"] = [render_example(e, tok, template, cfg) for e in train_ex[:2]]
    return Prepared(to_dataset(encoded), held, report)


def _count_by_source(examples: list[Example]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        src = e.loc.split("#")[0] if "#" in e.loc else e.loc.rsplit(":", 1)[0]
        out[src] = out.get(src, 0) + 1
    return out


def render_example(ex: Example, tok, template: ChatTemplate, cfg) -> dict:
    """A rendered example as segments [(text, supervised)], for `finetune data` and the report."""
    enc = encode(ex, tok, template, cfg.max_length, cfg.train_on_prompt)
    segments: list[list] = []
    for tid, lab in zip(enc.input_ids, enc.labels):
        sup = lab != -100
        piece = tok.decode([tid])
        if segments and segments[-1][1] == sup:
            segments[-1][0] += piece
        else:
            segments.append([piece, sup])
    return {"loc": ex.loc, "segments": segments}


def encode_all(examples: list[Example], tok, template, cfg) -> tuple[list[Encoded], dict]:
    out, truncated, dropped, first = [], 0, 0, []
    for ex in examples:
        enc = encode(ex, tok, template, cfg.max_length, cfg.train_on_prompt)
        if enc.truncated:
            if cfg.too_long == "error":
                raise RowError(ex.loc, f"example is longer than data.max_length={cfg.max_length} tokens "
                                       "(raise max_length, or set data.too_long: truncate or drop)")
            if cfg.too_long == "drop":
                dropped += 1
                first.append(f"{ex.loc}: longer than max_length")
                continue
            truncated += 1
        if all(label == -100 for label in enc.labels):
            dropped += 1
            first.append(f"{ex.loc}: no supervised token left after truncation")
            continue
        out.append(enc)
    if dropped:
        log.warning("dropped %d rows (too long or nothing to learn); first: %s", dropped, "; ".join(first[:3]))
    if not out:
        raise DataError(f"no training rows left: {dropped} were dropped ({'; '.join(first[:3])})")
    return out, {"truncated": truncated, "dropped": {"count": dropped, "first": first[:5]}}


def length_stats(encoded: list[Encoded], max_length: int, micro_batch: int = 1) -> dict:
    import numpy as np

    lengths = np.array([len(e.input_ids) for e in encoded])
    supervised = sum(sum(1 for x in e.labels if x != -100) for e in encoded)
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (5, 25, 50, 75, 95, 100)}
    return {"tokens": int(lengths.sum()), "supervised_tokens": int(supervised),
            "supervised_fraction": float(supervised / max(1, lengths.sum())), "length_percentiles": pct,
            "trl_packing_efficiency": trl_packing_efficiency(lengths.tolist(), max_length),
            "padded_efficiency": padded_efficiency(lengths.tolist(), micro_batch)}


def padded_efficiency(lengths: list[int], micro_batch: int) -> float:
    """Fraction of non-pad tokens when shuffled rows are padded to the longest in each micro-batch (no packing).

    Estimated over a seeded shuffle, as the trainer's sampler would order them."""
    order = list(lengths)
    random.Random(0).shuffle(order)
    padded = sum(max(order[i:i + micro_batch]) * len(order[i:i + micro_batch]) for i in range(0, len(order), micro_batch))
    return float(sum(order) / padded) if padded else 0.0


def trl_packing_efficiency(lengths: list[int], max_length: int) -> float:
    """How full TRL's own `packing=True` (best-fit-decreasing into max_length blocks, within each `datasets.map`
    batch of 1000 rows, long rows truncated) would fill its blocks: the baseline beside our packing's fill."""
    from finetune.data.packing import packed_blocks

    blocks = packed_blocks(lengths, max_length)
    return float(sum(min(n, max_length) for n in lengths if n > 0) / (blocks * max_length)) if blocks else 0.0


def to_dataset(encoded: list[Encoded]):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in encoded],
                                       "labels": [e.labels for e in encoded]})


def write_held_out(path: Path, held: list[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in held:
            f.write(json.dumps({"loc": ex.loc, "messages": ex.messages, "text": ex.text}, ensure_ascii=False) + "\n")


def data_hashes(recipe) -> dict[str, str]:
    """sha256 of every local data file the recipe reads (for the manifest and resume checks)."""
    out = {}
    for src in list(recipe.data.train) + list(recipe.data.eval or []):
        if looks_local(src.path):
            for f in source_files(src):
                out[str(f)] = file_sha256(f)
        else:
            out[src.path] = f"hub:{src.split}"
    return out
