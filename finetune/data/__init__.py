"""Datasets: read rows (with file:line), map each format to messages, tokenise with the template, split.

rows (file:line) -> canonical messages -> template -> input_ids + labels -> train / held-out
Nothing is dropped without a number: every skipped, truncated or dropped row is counted in the report.

    readers.py   files/hub -> (location, record)        formats.py  record -> Example (messages or text)
    encode.py    Example -> ids + labels, prompt ids    prepare.py  the pipeline, split, stats, cache use
"""

from finetune.data.encode import (Encoded, check_template_tokens, encode, prompt_ids, render_ids_and_mask,
                                  render_with_spans)
from finetune.data.formats import FORMAT_FIELDS, ROLES, SHAREGPT_ROLES, Example, check_turn_order, to_example
from finetune.data.prepare import (Prepared, data_hashes, encode_all, file_sha256, length_stats, load_examples,
                                   packing_efficiency, padded_efficiency, prepare, render_example, rendered_text,
                                   split_held_out, to_dataset, write_held_out)
from finetune.data.readers import DataError, RowError, read_records, source_files

__all__ = [
    "DataError", "Encoded", "Example", "FORMAT_FIELDS", "Prepared", "ROLES", "RowError", "SHAREGPT_ROLES",
    "check_template_tokens", "check_turn_order", "data_hashes", "encode", "encode_all", "file_sha256",
    "length_stats", "load_examples", "packing_efficiency", "padded_efficiency", "prepare", "prompt_ids",
    "read_records", "render_example", "render_ids_and_mask", "render_with_spans", "rendered_text",
    "source_files", "split_held_out", "to_dataset", "to_example", "write_held_out",
]
