"""What `--resume` treats as a different experiment: training sections and data, not eval/export."""

from __future__ import annotations

import yaml

from finetune import rundir
from finetune.resume import what_changed


def _run(tmp_path, recipe: dict):
    text = yaml.safe_dump(recipe)
    (tmp_path / "resolved.yaml").write_text(text)
    rundir.write_json(tmp_path / "manifest.json", {"resolved_sha256": rundir.sha256_text(text),
                                                   "data_sha256": {"a.jsonl": "x"}})
    return tmp_path


def test_eval_and_export_changes_do_not_block_a_resume(tmp_path):
    old = {"lora": {"r": 8}, "eval": {"limit": 5}, "export": {"gguf_type": "f16"}, "output_dir": "a"}
    run = _run(tmp_path, old)
    new = {"lora": {"r": 8}, "eval": {"limit": 9}, "export": {"gguf_type": ["f16", "q4_k_m"]}, "output_dir": "b"}
    assert what_changed(run, yaml.safe_dump(new), {"a.jsonl": "x"}) == []
    changed = {**new, "lora": {"r": 16}}
    assert what_changed(run, yaml.safe_dump(changed), {"a.jsonl": "x"}) == ["lora.r: 8 -> 16"]
    assert what_changed(run, yaml.safe_dump(new), {"a.jsonl": "y"}) == ["data file a.jsonl: content changed"]
