"""Fuzzing the recipe loader: any YAML document and any dotted override gives a valid Recipe or a RecipeError
(one line per problem), never another exception and never a traceback at the user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.recipe import Recipe, RecipeError, apply_override, field_docs, load_recipe

# Every key name the schema knows, so that generated documents reach deep into validation, not just the
# "unknown key" check at the top.
DOTTED = [k for k, _, _ in field_docs()]
NAMES = sorted({part for k in DOTTED for part in re.split(r"\.|\[\]\.?", k) if part})

SETTINGS = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["nf4", "chatml", "alpaca", "all-linear", "builtin:smollm2-135m-instruct", "cosine", "skip_step",
                     "", " ", "\x00", "a" * 300, "../x.jsonl", "/nonexistent/x.gguf", "~/x", "1e-4", "null", "[]"]),
)
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8), st.integers(-3, 3), st.booleans())
documents = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=15)

# Raw text built from YAML's own syntax: anchors, aliases, tags, flow/block mixes, tabs, duplicate keys.
FRAGMENTS = ["model:", "data:", "train:", "lora:", " base: x", "  - path: ", "&a ", "*a", "<<: *a", "!!python/object:os.system",
             "!!binary ", "!!set ", "!!float", "!!int", "!!bool", "!!timestamp 2020-99-99", "!!omap ", "? ", ": ", "- ", "[", "]", "{", "}", ",", "\n", "\n  ", "\t", "'", '"',
             "#", "---\n", "...\n", "%YAML 1.1\n", "|\n  ", ">\n", "1e309", "0x1F", ".nan", "~", "yes", "\ufeff", "\x85"]
yaml_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join)


def override_item():
    segment = st.one_of(st.sampled_from(NAMES), st.text(max_size=6))
    index = st.one_of(st.just(""), st.integers(0, 3).map(lambda i: f"[{i}]"), st.sampled_from(["[x]", "[-1]", "[]",
                                                                                             "[99999999999999999999]"]))
    key = st.lists(st.tuples(segment, index).map("".join), min_size=1, max_size=4).map(".".join)
    key = st.one_of(key, st.sampled_from(DOTTED).map(lambda k: k.replace("[]", "[0]")))
    value = st.one_of(st.text(max_size=12), st.sampled_from(["8", "true", "[a, b]", "{x: 1}", "&a [*a]", "!!set {a}",
                                                              "null", "", "-1", "1e-3", "nan", "'", "[", "@", "!!binary AA",
                                                              "!!float", "!!bool", "!!int x"]))
    return st.one_of(st.tuples(key, st.just("="), value).map("".join), st.text(max_size=15))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    doc = {"model": {"base": "builtin:smollm2-135m-instruct"},
           "data": {"train": [{"path": str(data)}], "template": "chatml"},
           "train": {"max_steps": 2}, "output_dir": str(root / "run")}
    load_recipe(_write(root / "ok.yaml", yaml.safe_dump(doc)))  # the base itself is valid
    return root, doc


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def _dotted(parent: str, key) -> str:
    """A location as RecipeError writes it: data.train[0].path (list indexes, and integer keys, in brackets; an
    empty key or one holding '.', ' ', ':' or brackets quoted, so it is never invisible)."""
    if isinstance(key, str) and (not key or any(c in key for c in ". :[]")):
        key = repr(key)
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else str(key))


def _locations(node, parent: str = "", seen=None) -> tuple[set[str], set[str]]:
    """Every location in a raw document, and those holding a mapping (where a key can be missing)."""
    found, mappings = set(), set()
    seen = set() if seen is None else seen
    if id(node) in seen:  # a YAML alias that contains itself (&a [*a])
        return found, mappings
    if isinstance(node, dict):
        seen = seen | {id(node)}
        mappings.add(parent)
        items = node.items()
    elif isinstance(node, (list, set, tuple)):  # a !!set validates as a list: its items are [0], [1], ...
        seen = seen | {id(node)}
        items = enumerate(node)
    else:
        return found, mappings
    for key, value in items:
        here = _dotted(parent, key)
        found.add(here)
        more, more_maps = _locations(value, here, seen)
        found |= more
        mappings |= more_maps
    return found, mappings


def _names_the_offender(problem: str, path: Path, overrides) -> bool:
    """A problem names what is wrong: the file, the YAML line, the override, or the key/field of the document."""
    assert problem.startswith(str(path)), problem
    rest = problem[len(str(path)):]
    if rest.startswith(": cannot read recipe (UnicodeDecodeError"):
        return True
    text = path.read_text(encoding="utf-8")
    syntax = re.match(r"(?::(\d+))?: invalid YAML: ", rest)
    if syntax:
        lines = len(re.split("\r\n|[\n\r\x85\u2028\u2029]", text))  # YAML's line breaks
        return syntax.group(1) is None or 1 <= int(syntax.group(1)) <= lines + 1
    if rest.startswith(": override "):
        return any(rest.startswith(f": override {item!r}: ") for item in overrides)
    raw = yaml.safe_load(text)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        return rest.startswith(": a recipe must be a mapping")
    for item in overrides:
        apply_override(raw, item)
    present, mappings = _locations(raw)
    if any(rest.startswith(f": {loc}: ") for loc in present):
        return True  # the offending key or value, where the document has it
    # else a field the schema requires, missing from a section the document has
    return any(rest.startswith(f": {_dotted(m, name)}: ") and "required" in rest for m in mappings for name in NAMES)


def _load_ok_or_recipe_error(path: Path, overrides=()) -> None:
    try:
        recipe = load_recipe(path, list(overrides))
    except RecipeError as e:
        assert e.problems and all(isinstance(p, str) and p.strip() for p in e.problems)
        assert all(str(path) in p for p in e.problems), e.problems
        unnamed = [p for p in e.problems if not _names_the_offender(p, path, overrides)]
        assert not unnamed, f"problems that do not name their field, key, line or override: {unnamed}"
        return
    assert isinstance(recipe, Recipe)


@SETTINGS
@given(doc=documents)
def test_any_yaml_document(base, doc):
    root, _ = base
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    _load_ok_or_recipe_error(_write(root / "doc.yaml", text))


@SETTINGS
@given(sections=st.dictionaries(st.sampled_from(["model", "data", "train", "lora", "quantization", "eval", "export",
                                                 "output_dir"]), documents, max_size=5))
def test_documents_shaped_like_recipes(base, sections):
    root, good = base
    doc = {**good, **sections}
    _load_ok_or_recipe_error(_write(root / "shaped.yaml", yaml.safe_dump(doc, allow_unicode=True)))


@SETTINGS
@given(text=yaml_text)
def test_any_yaml_text(base, text):
    root, _ = base
    path = root / "text.yaml"
    try:
        _write(path, text)
    except UnicodeEncodeError:
        return
    _load_ok_or_recipe_error(path)


@SETTINGS
@given(items=st.lists(override_item(), max_size=4))
def test_any_dotted_override(base, items):
    root, good = base
    _load_ok_or_recipe_error(_write(root / "over.yaml", yaml.safe_dump(good)), items)


@SETTINGS
@given(raw=st.dictionaries(keys, documents, max_size=4), item=override_item())
def test_apply_override_on_any_dict(raw, item):
    try:
        apply_override(raw, item)
    except ValueError as e:
        # it names the offending key segment or index, or shows the KEY=VALUE form that was not followed
        key = item.partition("=")[0].strip()
        segments = key.split(".")
        named = [repr(seg) for seg in segments] + [repr(seg.split("[")[0]) for seg in segments]
        named += [f"[{i}]" for i in re.findall(r"\[(\d+)\]", key)]
        assert "KEY=VALUE" in str(e) or any(n in str(e) for n in named), (item, str(e))
