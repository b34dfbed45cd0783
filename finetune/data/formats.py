"""Each row format -> one canonical conversation (or raw text), validated field by field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.data.readers import RowError
from finetune.recipe import DataSource
from finetune.templates import ChatTemplate

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    # preference methods (rows read by data/preference.py)
    "preference": ("prompt", "chosen", "rejected"),
    "preference_messages": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
OPTIONAL_FIELDS = ("input", "system")
"""Fields a row may leave out (alpaca's); every other field of a format is required."""
TEXT_PART_JOINER = "\n"
"""A turn whose content is a list of parts ([{"type": "text", "text": ...}], the OpenAI shape) becomes its text
parts joined by this: llama.cpp's server and vLLM join them with a newline when they hand list content to a
text-only chat template (so a model served that way sees what it was trained on). Hugging Face's multimodal
templates concatenate with no separator; we don't, since that glues the last word of one part to the next."""


@dataclass
class Example:
    loc: str
    """Where the row came from: `file:line` (jsonl/json), `file:row N` (csv/parquet) or `dataset[split]#i`."""
    messages: list[dict] | None
    """Canonical conversation; None for raw text."""
    text: str | None = None
    """Raw text (format `text`)."""


def to_example(loc: str, record: Any, src: DataSource, system_prompt: str | None = None) -> Example:
    if not isinstance(record, dict):
        raise RowError(loc, f"expected a JSON object with fields {list(FORMAT_FIELDS[src.format])}, got {type(record).__name__}")
    rec = _apply_columns(record, src, loc)
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


def _apply_columns(record: dict, src: DataSource, loc: str) -> dict:
    if not src.columns:
        return record
    out = dict(record)
    for ours, theirs in src.columns.items():
        if theirs in record:
            out[ours] = record[theirs]
        elif ours in record or ours not in OPTIONAL_FIELDS:
            # Never fall back to a column named like our field: the mapping says to read another one.
            have = ", ".join(map(str, record)) or "none"
            raise RowError(loc, f"columns {{{ours}: {theirs}}} names a column this row does not have: {theirs!r} "
                                f"(columns present: {have}); fix data.train[].columns or the file")
    return out


def columns_problem(src: DataSource, columns_seen: set) -> str | None:
    """A columns mapping that cannot apply to this source: a key that is not a field of its format (the
    mapping is {our field: your column}), or an (optional) field's column that no row has."""
    fields = FORMAT_FIELDS[src.format]
    for ours, theirs in src.columns.items():
        if ours not in fields:
            return (f"columns {{{ours}: {theirs}}}: {ours!r} is not a field of format {src.format} (fields: "
                    f"{', '.join(fields)}); the mapping reads {{our field: your column}}")
        if columns_seen and theirs not in columns_seen:
            have = ", ".join(sorted(map(str, columns_seen)))
            return (f"columns {{{ours}: {theirs}}} names a column no row has: {theirs!r} (columns present: "
                    f"{have}); fix data.train[].columns or the file")
    return None


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
        if isinstance(content, list):
            content = _text_of_parts(content, f"{where}.{content_key}", loc)
        if not isinstance(content, str):
            raise RowError(loc, f"{where}.{content_key} must be a string, got {type(content).__name__} "
                                "(or a list of text parts)")
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


def _text_of_parts(parts: list, where: str, loc: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RowError(loc, f"{at} must be an object like {{\"type\": \"text\", \"text\": ...}}, "
                                f"got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise RowError(loc, f"{at}.type is {kind!r}: only text parts can be trained (remove the part or the row)")
        if not isinstance(part.get("text"), str):
            raise RowError(loc, f"{at}.text must be a string, got {type(part.get('text')).__name__}")
        texts.append(part["text"])
    return TEXT_PART_JOINER.join(texts)


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
