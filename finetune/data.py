"""Datasets: read rows (with file:line), map each format to messages, tokenise with the template, split.

rows (file:line) -> canonical messages -> template -> input_ids + labels -> train / held-out
Nothing is dropped without a number: every skipped, truncated or dropped row is counted in the report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from finetune.recipe import DataSource, looks_local
from finetune.templates import ChatTemplate

log = logging.getLogger("finetune")

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class DataError(Exception):
    """One bad row or file: the message starts with `file:line` and names the field."""


@dataclass
class Example:
    loc: str
    """Where the row came from: `file:line` (jsonl/json), `file:row N` (csv/parquet) or `dataset[split]#i`."""
    messages: list[dict] | None
    """Canonical conversation; None for raw text."""
    text: str | None = None
    """Raw text (format `text`)."""


# ---------------------------------------------------------------------------------------------
# Reading


def source_files(src: DataSource) -> list[Path]:
    p = Path(src.path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".json", ".jsonl", ".csv", ".parquet"))
        if not files:
            raise DataError(f"{p}: directory has no .json/.jsonl/.csv/.parquet files")
        return files
    return [p]


def read_records(src: DataSource) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for every row of a source. Unparseable rows raise DataError."""
    if not looks_local(src.path):
        yield from _read_hub(src)
        return
    for path in source_files(src):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (add rows, or remove it from data.train)")
        suffix = path.suffix
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".csv":
            yield from _read_csv(path)
        elif suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def _decode(path: Path, raw: bytes, lineno: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:
            lineno = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None


def _read_jsonl(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(path, raw, lineno).strip()
            if not line:
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                # Yielded, not raised: a generator that raises is finished, and on_bad_row: skip must go on.
                yield f"{path}:{lineno}", RowError(f"{path}:{lineno}", f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path):
    text = _decode(path, path.read_bytes())
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text):
        raise DataError(f"{path}: file is empty")
    if text[i] != "[":
        # A single object, or JSON Lines saved with a .json suffix.
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        if _skip_ws(text, end) < len(text):
            yield from _read_jsonl(path)
            return
        rows = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else None
        if rows is None:
            raise DataError(f"{path}:1: expected a JSON array of rows (or JSON Lines)")
        for k, r in enumerate(rows):
            yield f"{path}:row {k}", r
        return
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # Inside one JSON array there is no way to resynchronise, so this is fatal even with skip.
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        yield f"{path}:{line}", obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] != "]":
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: invalid JSON: expected ',' or ']'")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_csv(path: Path):
    text = _decode(path, path.read_bytes())
    reader = csv.DictReader(text.splitlines(keepends=True))
    for rec in reader:
        yield f"{path}:{reader.line_num}", {k: v for k, v in rec.items() if k is not None}


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file has no rows")
    for k, rec in enumerate(table.to_pylist()):
        yield f"{path}:row {k}", rec


def _read_hub(src: DataSource):
    import datasets

    try:
        ds = datasets.load_dataset(src.path, split=src.split)
    except Exception as e:  # network errors, missing datasets and bad splits all surface differently
        raise DataError(f"data.train: cannot load hub dataset {src.path!r} split {src.split!r}: "
                        f"{str(e).splitlines()[0]} (offline? use a local file)") from None
    for k, rec in enumerate(ds):
        yield f"{src.path}[{src.split}]#{k}", rec


class RowError(DataError):
    """A single row is bad; with data.on_bad_row: skip it is counted and skipped instead of fatal."""

    def __init__(self, loc: str, problem: str):
        self.loc, self.problem = loc, problem
        super().__init__(f"{loc}: {problem}")


# ---------------------------------------------------------------------------------------------
# Formats -> canonical messages


def to_example(loc: str, record: Any, src: DataSource, system_prompt: str | None = None) -> Example:
    if not isinstance(record, dict):
        raise RowError(loc, f"expected a JSON object with fields {list(FORMAT_FIELDS[src.format])}, got {type(record).__name__}")
    rec = _apply_columns(record, src.columns)
    fmt = src.format
    if fmt == "text":
        return Example(loc, None, text=_string(rec, "text", loc, src))
    if fmt == "alpaca":
        instruction = _string(rec, "instruction", loc, src)
        extra = _string(rec, "input", loc, src, required=False)
        output = _string(rec, "output", loc, src, nonempty=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        sys = _string(rec, "system", loc, src, required=False)
        if sys:
            msgs.insert(0, {"role": "system", "content": sys})
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _string(rec, "prompt", loc, src)},
                {"role": "assistant", "content": _string(rec, "completion", loc, src, nonempty=True)}]
    elif fmt == "messages":
        msgs = _conversation(rec, "messages", loc, src, role_key="role", content_key="content", roles=None)
    else:  # sharegpt
        msgs = _conversation(rec, "conversations", loc, src, role_key="from", content_key="value", roles=SHAREGPT_ROLES)
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return Example(loc, msgs)


def _apply_columns(record: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if theirs in record:
            out[ours] = record[theirs]
    return out


def _field_name(name: str, src: DataSource) -> str:
    theirs = src.columns.get(name)
    return f"{name} (column {theirs!r})" if theirs else name


def _string(rec: dict, name: str, loc: str, src: DataSource, required: bool = True, nonempty: bool = False) -> str:
    if name not in rec or rec[name] is None:
        if required:
            have = ", ".join(map(str, rec)) or "none"
            raise RowError(loc, f"missing field {_field_name(name, src)!r} for format {src.format} "
                                f"(fields present: {have}; map yours with data.train[].columns)")
        return ""
    value = rec[name]
    if not isinstance(value, str):
        raise RowError(loc, f"field {_field_name(name, src)!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise RowError(loc, f"field {_field_name(name, src)!r} is empty (the reply to learn must have text)")
    return value


def _conversation(rec, key, loc, src, role_key, content_key, roles) -> list[dict]:
    turns = rec.get(key)
    if turns is None:
        raise RowError(loc, f"missing field {_field_name(key, src)!r} for format {src.format}")
    if not isinstance(turns, list) or not turns:
        raise RowError(loc, f"field {key!r} must be a non-empty list of turns, got {type(turns).__name__}")
    msgs = []
    for i, t in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise RowError(loc, f"{where} must be an object with {role_key!r} and {content_key!r}")
        role, content = t.get(role_key), t.get(content_key)
        if role is None or content is None:
            missing = role_key if role is None else content_key
            raise RowError(loc, f"{where}: missing field {missing!r}")
        if not isinstance(content, str):
            raise RowError(loc, f"{where}.{content_key} must be a string, got {type(content).__name__}")
        mapped = roles.get(role) if roles else (role if role in ROLES else None)
        if mapped is None:
            allowed = sorted(roles) if roles else list(ROLES)
            raise RowError(loc, f"{where}.{role_key}: unknown role {role!r} (use one of {allowed})")
        if mapped == "system" and i != 0:
            raise RowError(loc, f"{where}: a system turn may only come first")
        if mapped == "assistant" and not content.strip():
            raise RowError(loc, f"{where}: empty assistant reply (nothing to learn; remove the turn or the row)")
        msgs.append({"role": mapped, "content": content})
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError(loc, f"field {key!r} has no assistant turn (nothing to learn)")
    return msgs


def check_turn_order(ex: Example, template: ChatTemplate) -> None:
    if ex.messages is None or not template.alternating:
        return
    roles = [m["role"] for m in ex.messages if m["role"] != "system"]
    for i in range(1, len(roles)):
        if roles[i] == roles[i - 1]:
            raise RowError(ex.loc, f"turns {i - 1} and {i} are both {roles[i]!r}, which template {template.name} "
                                   "cannot express (merge them, or use a template such as chatml)")
    if roles and roles[0] != "user":
        raise RowError(ex.loc, f"template {template.name} needs the conversation to start with a user turn")


# ---------------------------------------------------------------------------------------------
# Tokenising: ids + labels, with the assistant-only mask taken from the template


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode(ex: Example, tok, template: ChatTemplate, max_length: int, train_on_prompt: bool = False) -> Encoded:
    if ex.messages is None:
        # The tokenizer's own post-processor decides about BOS (LLaMA adds it, ChatML models don't);
        # EOS is always appended so the model learns where a document ends.
        ids = tok(ex.text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids = ids + [tok.eos_token_id]
        labels = list(ids)
    else:
        ids, mask = render_ids_and_mask(ex.messages, tok, template)
        labels = list(ids) if train_on_prompt else [t if m else -100 for t, m in zip(ids, mask)]
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def render_ids_and_mask(messages: list[dict], tok, template: ChatTemplate) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its assistant mask (1 = supervised reply token)."""
    text, spans = render_with_spans(messages, tok, template, add_generation_prompt=False)
    return _segmented_ids(text, spans, tok)


def prompt_ids(messages: list[dict], tok, template: ChatTemplate) -> list[int]:
    """The ids the model sees at inference for a conversation that ends with a user turn.

    Tokenised exactly like the prompt part of a training example, so what the model was trained to continue
    is what it is asked to continue.
    """
    text, spans = render_with_spans(messages, tok, template, add_generation_prompt=True)
    return _segmented_ids(text, spans, tok)[0]


def render_with_spans(messages, tok, template: ChatTemplate, add_generation_prompt: bool):
    """The rendered text and the character spans of every assistant reply (including its end token).

    Templates with `{% generation %}` mark the spans themselves; for a model's own template without
    markers, a reply is what rendering it adds after the generation prompt.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(msgs, gen):
        out, idx = render_jinja_template(conversations=[msgs], chat_template=template.source,
                                         return_assistant_tokens_mask=template.has_generation_markers,
                                         add_generation_prompt=gen, **tok.special_tokens_map)
        return out[0], (idx[0] if idx else [])

    text, spans = render(messages, add_generation_prompt)
    if template.has_generation_markers:
        return text, [tuple(s) for s in spans]
    end = template.end_token(tok)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = render(messages[:i], True)
        upto, _ = render(messages[: i + 1], False)
        if not text.startswith(before) or not text.startswith(upto):
            raise DataError(f"template {template.name}: rendering is not append-only, so replies cannot be located; "
                            "use a template from data_templates/ (they mark replies with {% generation %})")
        tail = upto[len(before):]
        stop = len(before) + tail.rfind(end) + len(end) if end and end in tail else len(upto)
        spans.append((len(before), stop))
    return text, spans


def _segmented_ids(text: str, spans, tok) -> tuple[list[int], list[int]]:
    """Tokenise prompt and reply segments separately and concatenate.

    BPE can merge characters across the prompt/reply boundary ("\\n\\n" + "red" -> "\\n\\nred"), which would make
    the training prompt differ from the prompt tokenised alone at inference. Cutting at the boundaries makes
    the prompt ids identical by construction.
    """
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, stop in list(spans) + [(len(text), len(text))]:
        for piece, supervised in ((text[pos:start], 0), (text[start:stop], 1)):
            if piece:
                part = tok(piece, add_special_tokens=False)["input_ids"]
                ids += part
                mask += [supervised] * len(part)
        pos = stop
    return ids, mask


def check_template_tokens(tok, template: ChatTemplate) -> list[str]:
    """Template-level problems found on a probe conversation: double BOS, unsupervised end token."""
    problems = []
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    ids, mask = render_ids_and_mask(probe, tok, template)
    bos = tok.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        problems.append(f"template {template.name}: the rendered text starts with two BOS tokens")
    end_id = tok.convert_tokens_to_ids(template.end_token(tok))
    supervised = [t for t, m in zip(ids, mask) if m]
    if not supervised:
        problems.append(f"template {template.name}: no assistant tokens are marked; wrap replies in {{% generation %}}")
    elif supervised[-1] != end_id:
        problems.append(f"template {template.name}: the end-of-turn token {template.end_token(tok)!r} is not supervised "
                        "(put it inside {% generation %})")
    return problems


# ---------------------------------------------------------------------------------------------
# The whole pipeline: sources -> examples -> split -> encoded datasets + report


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
        for loc, rec in read_records(src):
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
    n = int(round(held_out * len(unique))) if held_out < 1 else int(held_out)
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
    from finetune import data_cache

    key = data_cache.fingerprint(recipe, tok, template) if use_cache else None
    if key:
        hit = data_cache.load(key)
        if hit is not None:
            train, held_rows, report = hit
            report["cache"] = {"hit": True, "key": key}
            return Prepared(train, [Example(**r) for r in held_rows], report)
    prepared = _prepare_uncached(recipe, tok, template)
    if key:
        data_cache.store(key, prepared.train, [vars(e) for e in prepared.held_out], prepared.report)
        prepared.report["cache"] = {"hit": False, "key": key}
    return prepared


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
            "packing_efficiency": packing_efficiency(lengths.tolist(), max_length),
            "padded_efficiency": padded_efficiency(lengths.tolist(), micro_batch)}


def padded_efficiency(lengths: list[int], micro_batch: int) -> float:
    """Fraction of non-pad tokens when shuffled rows are padded to the longest in each micro-batch (no packing).

    Estimated over a seeded shuffle, as the trainer's sampler would order them."""
    order = list(lengths)
    random.Random(0).shuffle(order)
    padded = sum(max(order[i:i + micro_batch]) * len(order[i:i + micro_batch]) for i in range(0, len(order), micro_batch))
    return float(sum(order) / padded) if padded else 0.0


def packing_efficiency(lengths: list[int], max_length: int) -> float:
    """Fraction of real tokens in max_length blocks filled best-fit-decreasing (what TRL's BFD packing does)."""
    bins: list[int] = []
    for n in sorted(lengths, reverse=True):
        for i, used in enumerate(bins):
            if used + n <= max_length:
                bins[i] += n
                break
        else:
            bins.append(min(n, max_length))
    return float(sum(min(n, max_length) for n in lengths) / (len(bins) * max_length)) if bins else 0.0


def to_dataset(encoded: list[Encoded]):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in encoded],
                                       "labels": [e.labels for e in encoded]})


def write_held_out(path: Path, held: list[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in held:
            f.write(json.dumps({"loc": ex.loc, "messages": ex.messages, "text": ex.text}, ensure_ascii=False) + "\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
