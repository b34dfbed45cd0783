"""Task rows: read held_out.jsonl or a task's JSONL into prompts, references and choices.

Rows are checked as they are read; a bad row is an EvalError that starts with `file:line` and says what
the row needs, the same way training data is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError


class EvalError(UserError):
    """An evaluation input the user must fix (task file, run directory, metric); one line with the fix."""


@dataclass
class Item:
    id: str
    """Where the row came from: `file:line`, or the held-out row's original location."""
    prompt: list[dict] | None
    """The conversation the model answers (ends with a user turn); None for raw-text rows."""
    references: list[str] = field(default_factory=list)
    full: list[dict] | None = None
    """Prompt + reference reply, for the teacher-forced loss (held_out)."""
    text: str | None = None
    """Raw text (held-out rows of data format `text`): loss only."""
    choices: list[str] = field(default_factory=list)
    answer: int | None = None


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise EvalError(f"{path}: file not found (check eval.tasks[].path)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{loc}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise EvalError(f"{loc}: expected a JSON object, got {type(row).__name__}")
        rows.append((loc, row))
    return rows


def held_out_items(run: Path) -> list[Item]:
    """held_out.jsonl rows: prompt = every turn before the last, reference = the last assistant reply."""
    items = []
    for _, row in read_jsonl(run / "held_out.jsonl"):
        msgs = row.get("messages")
        if not msgs:
            items.append(Item(row.get("loc", "?"), None, text=row.get("text") or ""))
            continue
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        items.append(Item(row.get("loc", "?"), msgs[:last], [msgs[last]["content"]], full=msgs[: last + 1]))
    return items


def _prompt(loc: str, row: dict, system_prompt: str | None) -> tuple[list[dict], str | None]:
    """The conversation to answer, and the reply it ends with when the row gives one as its last turn."""
    reply = None
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                              for m in msgs):
            raise EvalError(f"{loc}: messages must be a non-empty list of {{role, content}} objects")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if msgs[-1]["role"] == "assistant":
            reply = msgs.pop()["content"]
    elif "instruction" in row or "question" in row or "prompt" in row:
        key = next(k for k in ("instruction", "question", "prompt") if k in row)
        text = row[key]
        if not isinstance(text, str):
            raise EvalError(f"{loc}: field {key!r} must be a string")
        if isinstance(row.get("input"), str) and row["input"]:
            text = f"{text}\n\n{row['input']}"  # the alpaca mapping training uses (finetune.data.to_example)
        msgs = [{"role": "user", "content": text}]
    else:
        raise EvalError(f"{loc}: a task row needs `messages`, or `instruction` (+ `input`), `question` or `prompt`")
    if not msgs or msgs[-1]["role"] != "user":
        raise EvalError(f"{loc}: the prompt must end with a user turn")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})  # as training did for rows without one
    return msgs, reply


def _references(loc: str, row: dict, reply: str | None) -> list[str]:
    for key in ("references", "reference", "answer", "output", "completion"):
        if key in row:
            refs = row[key] if isinstance(row[key], list) else [row[key]]
            if not refs or not all(isinstance(r, str) for r in refs):
                raise EvalError(f"{loc}: field {key!r} must be a string or a non-empty list of strings")
            return refs
    if reply is not None:
        return [reply]
    return []


def generate_items(path: Path, system_prompt: str | None, need_refs: bool) -> list[Item]:
    items = []
    for loc, row in read_jsonl(path):
        prompt, reply = _prompt(loc, row, system_prompt)
        refs = _references(loc, row, reply)
        if need_refs and not refs:
            raise EvalError(f"{loc}: no reference answer; add `reference` (a string) or `references` (a list)")
        items.append(Item(loc, prompt, refs))
    return items


def choice_items(path: Path, system_prompt: str | None) -> list[Item]:
    items = []
    for loc, row in read_jsonl(path):
        prompt, _ = _prompt(loc, row, system_prompt)
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalError(f"{loc}: `choices` must be a list of at least two non-empty strings")
        answer = row.get("answer", row.get("label"))
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise EvalError(f"{loc}: `answer` must be the index of the right choice (0..{len(choices) - 1}) "
                            "or the choice text itself")
        items.append(Item(loc, prompt, [choices[answer]], choices=choices, answer=answer))
    return items


def preference_items(task, run: Path, system_prompt: str | None) -> list[Item]:
    """Pairs: choices = [chosen, rejected], answer 0. From the task's file (format preference or
    preference_messages, checked row by row as training checks them), else from a preference run's held-out pairs."""
    from finetune.data.preference import to_preference_example
    from finetune.recipe import DataSource

    if task.path is None:
        rows = [(r.get("loc", "?"), r) for _, r in read_jsonl(run / "held_out.jsonl")]
        pairs = [(loc, {"chosen": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": r["prompt"] + [{"role": "assistant", "content": r["rejected"]}]})
                 for loc, r in rows if r.get("rejected")]
        if not pairs:
            raise EvalError(f"{run / 'held_out.jsonl'}: no held-out pairs (a preference run with data.held_out has "
                            "them); give the task a path to a preference JSONL file")
        system_prompt = None  # held-out prompts already carry the run's system prompt
    else:
        pairs = read_jsonl(Path(task.path))
    items = []
    for loc, row in pairs:
        fmt = "preference_messages" if isinstance(row.get("chosen"), list) else "preference"
        ex = to_preference_example(loc, row, DataSource.model_construct(path=str(task.path), format=fmt, columns={}),
                                   system_prompt)
        items.append(Item(loc, ex.prompt, [ex.chosen], choices=[ex.chosen, ex.rejected], answer=0))
    return items


def load_items(task, run: Path, system_prompt: str | None, limit: int | None) -> list[Item]:
    """The rows of one task, the first `limit` of them when asked (rows are in file order: reproducible)."""
    if task.kind == "held_out":
        items = held_out_items(run)
        if not items:
            raise EvalError(f"{run / 'held_out.jsonl'}: no held-out rows; set data.held_out (e.g. 20) and train "
                            "again, or give the task a path")
    elif task.kind == "generate":
        items = generate_items(Path(task.path), system_prompt, need_refs=task.metrics != ["regex"])
    elif task.kind == "multiple_choice":
        items = choice_items(Path(task.path), system_prompt)
    elif task.kind == "preference":
        items = preference_items(task, run, system_prompt)
    else:
        raise ValueError(task.kind)
    if not items:
        raise EvalError(f"{task.path}: the task file has no rows")
    return items[:limit] if limit else items
