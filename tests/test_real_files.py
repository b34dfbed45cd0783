"""Files people really have: a BOM and CRLF (Windows, Excel), OpenAI-style content parts, .gz dumps, a columns
mapping that names a column the file lacks, a held-out split bigger than the data. Each loads or is one line."""

from __future__ import annotations

import bz2
import gzip
import json

import pytest

from conftest import make_recipe
from finetune.data import DataError, prepare
from finetune.recipe import load_recipe
from finetune.templates import load_template

BOM = b"\xef\xbb\xbf"
ROWS = [{"instruction": "what is red", "input": "", "output": "one"},
        {"instruction": "what is blue", "input": "", "output": "three"}]
RENDERED = ["<|im_start|>user\nwhat is red<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n",
            "<|im_start|>user\nwhat is blue<|im_end|>\n<|im_start|>assistant\nthree<|im_end|>\n"]


def crlf_jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\r\n" for r in rows)


def crlf_json(*rows) -> bytes:
    return b"[\r\n" + b",\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n]\r\n"


def crlf_csv(*rows) -> bytes:
    cols = list(rows[0])
    return b"".join((",".join(str(r[c]) for c in cols) + "\r\n").encode() for r in [dict(zip(cols, cols)), *rows])


def _prepare(tmp_path, model_dir, tok, name, content, on_bad_row="error", **source):
    """`content` None: `name` is a directory made by the test."""
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    held_out = source.pop("held_out", 0)
    data = {"train": [{"path": str(f), **source}], "template": "chatml", "on_bad_row": on_bad_row,
            "held_out": held_out}
    recipe = load_recipe(make_recipe(tmp_path, model_dir, rows=ROWS, data=data))
    return f, prepare(recipe, tok, load_template("chatml"), use_cache=False)


def _error(tmp_path, model_dir, tok, name, content, **source) -> tuple:
    with pytest.raises(DataError) as e:
        _prepare(tmp_path, model_dir, tok, name, content, **source)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return tmp_path / name, msg


def _texts(prepared, tok) -> list[str]:
    return [tok.decode(ids) for ids in prepared.train["input_ids"]]


# --- 1. a UTF-8 byte-order mark and CRLF line ends ------------------------------------------------------------

@pytest.mark.parametrize("name,content", [("d.jsonl", BOM + crlf_jsonl(*ROWS)), ("d.json", BOM + crlf_json(*ROWS)),
                                          ("d.csv", BOM + crlf_csv(*ROWS))], ids=["jsonl", "json", "csv"])
def test_bom_and_crlf_load(name, content, tmp_path, tiny_model_dir, tiny_tokenizer):
    _, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, name, content)
    assert _texts(out, tiny_tokenizer) == RENDERED  # no "\ufeff" glued to the first field, no "\r" in any


@pytest.mark.parametrize("name,content,expected", [
    ("d.jsonl", BOM + crlf_jsonl(*ROWS, b'{"instruction": '), ":3: invalid JSON"),
    ("d.jsonl", BOM + crlf_jsonl(*ROWS, {"instruction": "x"}), ":3: missing field 'output'"),
    ("d.json", BOM + b'[\r\n{"instruction": "a", "output": "b"},\r\n{"instruction": }\r\n]', ":3: invalid JSON"),
    ("d.csv", BOM + b"instruction,input,output\r\na,,b\r\nc,,\r\n", ":3: field 'output' is empty"),
], ids=["jsonl bad json", "jsonl missing field", "json array", "csv"])
def test_line_numbers_stay_right_with_bom_and_crlf(name, content, expected, tmp_path, tiny_model_dir, tiny_tokenizer):
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, name, content)
    assert msg.startswith(f"{f}{expected}"), msg


def test_csv_keeps_unicode_line_separators_inside_a_field(tmp_path, tiny_model_dir, tiny_tokenizer):
    # Text exported from JSON often holds U+2028; it is not a CSV line end (str.splitlines treats it as one).
    content = BOM + "instruction,input,output\r\nwhat is\u2028red,,one\r\nx,,\r\n".encode()
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.csv", content)
    assert msg.startswith(f"{f}:3: field 'output' is empty"), msg


def test_skip_works_past_a_bom_line(tmp_path, tiny_model_dir, tiny_tokenizer):
    f, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl",
                      BOM + crlf_jsonl(ROWS[0], b"{broken", ROWS[1]), on_bad_row="skip")
    assert _texts(out, tiny_tokenizer) == RENDERED
    assert [x.split(": ")[0] for x in out.report["skipped_rows"]["first"]] == [f"{f}:2"]


# --- 2. content as a list of parts (the OpenAI shape) -----------------------------------------------------------

def parts(*texts) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_content_parts_load_joined_by_newline(tmp_path, tiny_model_dir, tiny_tokenizer):
    row = {"messages": [{"role": "system", "content": parts("be brief")},
                        {"role": "user", "content": parts("what is", "red")},
                        {"role": "assistant", "content": parts("one")}]}
    _, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", crlf_jsonl(row), format="messages")
    assert _texts(out, tiny_tokenizer) == [
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is\nred<|im_end|>\n"
        "<|im_start|>assistant\none<|im_end|>\n"]
    labels = out.train["labels"][0]
    assert tiny_tokenizer.decode([t for t in labels if t != -100]) == "one<|im_end|>"


def test_sharegpt_value_parts_load(tmp_path, tiny_model_dir, tiny_tokenizer):
    row = {"conversations": [{"from": "human", "value": parts("what is red")}, {"from": "gpt", "value": "one"}]}
    _, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", crlf_jsonl(row), format="sharegpt")
    assert _texts(out, tiny_tokenizer) == RENDERED[:1]


@pytest.mark.parametrize("content,expected", [
    ([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
     ":2: messages[0].content[1].type is 'image_url': only text parts can be trained"),
    ([{"text": "no type"}], ":2: messages[0].content[0].type is None"),
    (["a bare string"], ":2: messages[0].content[0] must be an object like"),
    ([{"type": "text", "text": 5}], ":2: messages[0].content[0].text must be a string, got int"),
], ids=["image part", "no type", "not an object", "text not a string"])
def test_non_text_part_is_one_line_with_file_line(content, expected, tmp_path, tiny_model_dir, tiny_tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "hello"}]}
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", crlf_jsonl(good, bad), format="messages")
    assert msg.startswith(f"{f}{expected}"), msg


def test_assistant_parts_with_no_text_are_an_empty_reply(tmp_path, tiny_model_dir, tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]}
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", crlf_jsonl(row), format="messages")
    assert msg.startswith(f"{f}:1: messages[1]: empty assistant reply"), msg


# --- 3. compressed files ---------------------------------------------------------------------------------------

def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@pytest.mark.parametrize("name,content", [
    ("d.jsonl.gz", gzip.compress(jsonl(*ROWS))),
    ("d.json.gz", gzip.compress(json.dumps(ROWS).encode())),
    ("d.csv.gz", gzip.compress(crlf_csv(*ROWS))),
    ("d.jsonl.bz2", bz2.compress(jsonl(*ROWS))),
    ("d.jsonl.gz", gzip.compress(BOM + crlf_jsonl(*ROWS))),
], ids=["jsonl.gz", "json.gz", "csv.gz", "jsonl.bz2", "jsonl.gz with bom and crlf"])
def test_compressed_files_load(name, content, tmp_path, tiny_model_dir, tiny_tokenizer):
    _, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, name, content)
    assert _texts(out, tiny_tokenizer) == RENDERED


def test_compressed_row_errors_carry_file_line(tmp_path, tiny_model_dir, tiny_tokenizer):
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl.gz",
                    gzip.compress(jsonl(ROWS[0], {"instruction": "x", "output": ["a"]})))
    assert msg.startswith(f"{f}:2: field 'output' must be a string, got list"), msg


def test_directory_picks_up_compressed_files(tmp_path, tiny_model_dir, tiny_tokenizer):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(ROWS[0])))
    (d / "b.csv").write_bytes(crlf_csv(ROWS[1]))
    (d / "notes.txt.gz").write_bytes(gzip.compress(b"not data"))
    _, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, "dir", None)
    assert _texts(out, tiny_tokenizer) == RENDERED


@pytest.mark.parametrize("content,expected", [
    (b"this is not gzip", "not a readable gzip file (BadGzipFile"),
    (gzip.compress(jsonl(*ROWS) * 50)[:-30], "not a readable gzip file (EOFError"),
], ids=["not gzip", "truncated"])
def test_broken_gzip_is_one_line(content, expected, tmp_path, tiny_model_dir, tiny_tokenizer):
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl.gz", content)
    assert msg.startswith(f"{f}: {expected}"), msg


# --- 4. a columns mapping that names a column the file does not have --------------------------------------------

def test_mapping_to_a_missing_column_is_an_error_not_the_original_column(tmp_path, tiny_model_dir, tiny_tokenizer):
    # The file has `instruction`, so the old code silently trained on it and ignored the mapping.
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", jsonl(*ROWS),
                    columns={"instruction": "question"})
    assert msg.startswith(f"{f}:1: columns {{instruction: question}} names a column this row does not have: "
                          "'question' (columns present: instruction, input, output)"), msg


def test_mapping_an_optional_field_to_a_column_no_row_has(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"question": "what is red", "answer": "one"}, {"question": "what is blue", "answer": "three"}]
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.csv", crlf_csv(*rows),
                    columns={"instruction": "question", "output": "answer", "input": "contxt"})
    assert msg.startswith(f"{f}: columns {{input: contxt}} names a column no row has: 'contxt' "
                          "(columns present: answer, question)"), msg


def test_mapping_written_the_wrong_way_round(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"question": "what is red", "answer": "one"}]
    f, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", jsonl(*rows),
                    columns={"question": "instruction", "answer": "output"})
    assert msg.startswith(f"{f}: columns {{question: instruction}}: 'question' is not a field of format alpaca"), msg


def test_optional_mapped_column_may_be_absent_from_some_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"q": "what is red", "a": "one", "ctx": ""}, {"q": "what is blue", "a": "three"}]
    _, out = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", jsonl(*rows),
                      columns={"instruction": "q", "output": "a", "input": "ctx"})
    assert _texts(out, tiny_tokenizer) == RENDERED


# --- 5. a held-out split that takes every row --------------------------------------------------------------------

@pytest.mark.parametrize("held_out", [4, 0.2])
def test_held_out_taking_every_row_says_so(held_out, tmp_path, tiny_model_dir, tiny_tokenizer):
    _, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", jsonl(ROWS[0]), held_out=held_out)
    assert msg.startswith(f"data.held_out: {held_out:g}: the held-out split took every row: the data has 1 row,"), msg


def test_held_out_counts_distinct_rows(tmp_path, tiny_model_dir, tiny_tokenizer):
    _, msg = _error(tmp_path, tiny_model_dir, tiny_tokenizer, "d.jsonl", jsonl(ROWS[0], ROWS[0], ROWS[0]), held_out=1)
    assert "the data has 3 rows (1 distinct once rendered)" in msg, msg
