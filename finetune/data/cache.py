"""A tokenised-data cache keyed by everything that can change the tokens.

The key covers the data files' *contents*, the tokenizer's *contents* (vocabulary, merges, special tokens
and normaliser — not its name), the template text, every data option (max_length, masking, packing,
too_long, on_bad_row, held-out split, sources), the seed and the code that tokenises. A reused cache after a
tokenizer change is a silent failure in other tools; here any change is a miss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetune import __version__, rundir

_CODE_FILES = ("data/readers.py", "data/formats.py", "data/encode.py", "data/prepare.py", "data/cache.py",
               "templates.py")


def _code_version() -> str:
    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).resolve().parent.parent  # the finetune package
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full serialisation, its special tokens and added vocabulary."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tok.get_added_vocab().items())).encode())
    h.update(str(getattr(tok, "add_bos_token", None)).encode())
    return h.hexdigest()


def fingerprint(recipe, tok, template, data_hashes: dict) -> str:
    """`data_hashes`: the content hash of every data source (prepare.data_hashes), passed in so that this module
    imports nothing of the data package (no import cycle)."""
    parts = {
        "data_files": data_hashes,
        "data_options": recipe.data.model_dump(mode="json"),
        "seed": recipe.train.seed,
        "micro_batch": recipe.train.micro_batch_size,
        "tokenizer": tokenizer_fingerprint(tok),
        "template": template.source,
        "code": _code_version(),
    }
    if any(v.startswith("hub:") for v in parts["data_files"].values()):
        return ""  # a hub dataset has no content hash we can trust offline: never cache it
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _dir(key: str) -> Path:
    return rundir.cache_root() / "data" / key


def load(key: str):
    """(train Dataset, held-out rows, report) on a hit, else None."""
    d = _dir(key)
    if not (d / "complete").is_file():
        return None
    import datasets

    train = datasets.load_from_disk(str(d / "train"))
    held = [json.loads(line) for line in (d / "held_out.jsonl").read_text(encoding="utf-8").splitlines() if line]
    report = json.loads((d / "report.json").read_text(encoding="utf-8"))
    return train, held, report


def cached(key: str, build, example_type, prepared_type):
    """prepared_type(train, held-out examples, report) from the cache under `key`, else build() stored under it
    (an empty key: never cached). The report says which it was."""
    if key and (hit := load(key)) is not None:
        train, held_rows, report = hit
        report["cache"] = {"hit": True, "key": key}
        return prepared_type(train, [example_type(**r) for r in held_rows], report)
    prepared = build()
    if key:
        store(key, prepared.train, [vars(e) for e in prepared.held_out], prepared.report)
        prepared.report["cache"] = {"hit": False, "key": key}
    return prepared


def store(key: str, train, held_rows: list[dict], report: dict) -> None:
    """Published whole (rundir.publishing_dir), so a crash never leaves a half cache that looks whole."""
    d = _dir(key)
    if (d / "complete").is_file():  # another process stored the same key first: same content
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    with rundir.publishing_dir(d, marker="complete") as tmp:
        train.save_to_disk(str(tmp / "train"))
        (tmp / "held_out.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held_rows),
                                            encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report), encoding="utf-8")
