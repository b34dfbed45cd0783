"""Malformed dataset files: each gives one line with file:line (or row) and the field; `skip` counts them."""

from __future__ import annotations

import json

import pytest

from conftest import make_recipe
from finetune.data import DataError, prepare
from finetune.recipe import load_recipe
from finetune.templates import load_template

GOOD = {"instruction": "what is red", "input": "", "output": "one"}
U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def jl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def parquet_bytes(rows) -> bytes:
    import io

    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf)
    return buf.getvalue()


# (id, file name, contents, source options, template, expected message after the path)
CASES = [
    ("invalid json", "d.jsonl", jl(GOOD, GOOD, b'{"instruction": "x", '), {}, "chatml", ":3: invalid JSON: Expecting"),
    ("missing field", "d.jsonl", jl(GOOD, {"instruction": "x", "input": ""}), {}, "chatml",
     ":2: missing field 'output' for format alpaca"),
    ("list where string", "d.jsonl", jl(GOOD, {"instruction": "x", "output": ["a", "b"]}), {}, "chatml",
     ":2: field 'output' must be a string, got list"),
    ("number where string", "d.jsonl", jl({"instruction": 5, "output": "a"}), {}, "chatml",
     ":1: field 'instruction' must be a string, got int"),
    ("empty file", "d.jsonl", b"", {}, "chatml", ": file is empty"),
    ("unknown role", "d.jsonl", jl({"messages": [U, {"role": "bot", "content": "x"}]}), {"format": "messages"}, "chatml",
     ":1: messages[1].role: unknown role 'bot'"),
    ("two assistant turns, alternating template", "d.jsonl", jl({"messages": [U, A, A]}), {"format": "messages"},
     "llama2_chat", ":1: turns 1 and 2 are both 'assistant', which template llama2_chat cannot express"),
    ("invalid utf-8", "d.jsonl", jl(GOOD) + b'{"instruction": "caf\xe9", "output": "x"}\n', {}, "chatml",
     ":2: invalid UTF-8 (byte 0xe9)"),
    ("empty assistant reply", "d.jsonl", jl({"messages": [U, {"role": "assistant", "content": "  "}]}),
     {"format": "messages"}, "chatml", ":1: messages[1]: empty assistant reply"),
    ("empty alpaca output", "d.jsonl", jl({"instruction": "x", "output": ""}), {}, "chatml",
     ":1: field 'output' is empty"),
    ("row is not an object", "d.jsonl", jl(GOOD, ["a", "b"]), {}, "chatml", ":2: expected a JSON object"),
    ("sharegpt unknown speaker", "d.jsonl", jl({"conversations": [{"from": "robot", "value": "x"}]}),
     {"format": "sharegpt"}, "chatml", ":1: conversations[0].from: unknown role 'robot'"),
    ("messages not a list", "d.jsonl", jl({"messages": "hi"}), {"format": "messages"}, "chatml",
     ":1: field 'messages' must be a non-empty list of turns, got str"),
    ("messages empty", "d.jsonl", jl({"messages": []}), {"format": "messages"}, "chatml",
     ":1: field 'messages' must be a non-empty list of turns"),
    ("no assistant turn", "d.jsonl", jl({"messages": [U]}), {"format": "messages"}, "chatml",
     ":1: field 'messages' has no assistant turn"),
    ("system not first", "d.jsonl", jl({"messages": [U, {"role": "system", "content": "s"}, A]}),
     {"format": "messages"}, "chatml", ":1: messages[1]: a system turn may only come first"),
    ("content not a string", "d.jsonl", jl({"messages": [{"role": "user", "content": {"x": 1}}, A]}),
     {"format": "messages"}, "chatml", ":1: messages[0].content must be a string, got dict"),
    ("turn without content", "d.jsonl", jl({"messages": [{"role": "user"}, A]}), {"format": "messages"}, "chatml",
     ":1: messages[0]: missing field 'content'"),
    ("csv missing column", "d.csv", b"instruction,input\nx,y\nz,w\n", {}, "chatml",
     ":2: missing field 'output' for format alpaca"),
    ("parquet wrong type", "d.parquet", parquet_bytes([{"instruction": 3, "output": "a"}]), {}, "chatml",
     ":row 0: field 'instruction' must be a string, got int"),
    ("json array bad element", "d.json", b'[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]', {}, "chatml",
     ":3: invalid JSON: Expecting value"),
    ("json object, not rows", "d.json", b'{"instruction": "a"}', {}, "chatml", ":1: expected a JSON array of rows"),
    ("text format missing text", "d.jsonl", jl({"content": "x"}), {"format": "text"}, "chatml",
     ":1: missing field 'text' for format text"),
    ("empty completion", "d.jsonl", jl({"prompt": "p", "completion": ""}), {"format": "prompt_completion"}, "chatml",
     ":1: field 'completion' is empty"),
    ("mapped column missing", "d.jsonl", jl({"question": "q", "reply": "r"}),
     {"columns": {"instruction": "question", "output": "answer"}}, "chatml",
     ":1: columns {output: answer} names a column this row does not have: 'answer' (columns present: question, reply)"),
    ("corrupt parquet", "d.parquet", b"PAR1 this is not parquet", {}, "chatml", ": not a readable parquet file"),
]


def _recipe(tmp_path, model_dir, name, content, options, template, on_bad_row="error"):
    f = tmp_path / name
    f.write_bytes(content)
    p = make_recipe(tmp_path, model_dir, rows=[GOOD],
                    data={"train": [{"path": str(f), **options}], "template": template, "on_bad_row": on_bad_row})
    return f, load_recipe(p)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_file_message(case, tmp_path, tiny_model_dir, tiny_tokenizer):
    _, name, content, options, template, expected = case
    f, recipe = _recipe(tmp_path, tiny_model_dir, name, content, options, template)
    with pytest.raises(DataError) as e:
        prepare(recipe, tiny_tokenizer, load_template(template), use_cache=False)
    msg = str(e.value)
    assert msg.startswith(f"{f}{expected}"), msg
    assert "\n" not in msg


def test_skip_counts_every_bad_row(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [GOOD, b"{broken", GOOD, {"instruction": "x"}, {"messages": 1}, GOOD, {"instruction": "y", "output": [1]}, GOOD]
    f, recipe = _recipe(tmp_path, tiny_model_dir, "d.jsonl", jl(*rows), {}, "chatml", on_bad_row="skip")
    out = prepare(recipe, tiny_tokenizer, load_template("chatml"), use_cache=False)
    assert out.report["skipped_rows"]["count"] == 4
    assert out.report["rows"]["train"] == 4
    assert [x.split(": ")[0] for x in out.report["skipped_rows"]["first"]] == [f"{f}:2", f"{f}:4", f"{f}:5", f"{f}:7"]


def test_skip_with_messages_and_template_rules(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"messages": [U, A]}, {"messages": [U, A, A]}, {"messages": [U, {"role": "bot", "content": "x"}]},
            {"messages": [U, {"role": "assistant", "content": ""}]}, {"messages": [U, A]}]
    f, recipe = _recipe(tmp_path, tiny_model_dir, "d.jsonl", jl(*rows), {"format": "messages"}, "llama2_chat",
                        on_bad_row="skip")
    out = prepare(recipe, tiny_tokenizer, load_template("llama2_chat"), use_cache=False)
    assert (out.report["skipped_rows"]["count"], out.report["rows"]["train"]) == (3, 2)


def test_all_rows_bad_is_an_error_even_with_skip(tmp_path, tiny_model_dir, tiny_tokenizer):
    f, recipe = _recipe(tmp_path, tiny_model_dir, "d.jsonl", jl({"a": 1}, {"b": 2}), {}, "chatml", on_bad_row="skip")
    with pytest.raises(DataError, match=r"no usable rows \(2 skipped as bad\)"):
        prepare(recipe, tiny_tokenizer, load_template("chatml"), use_cache=False)
