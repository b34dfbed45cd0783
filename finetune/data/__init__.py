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
                                   trl_packing_efficiency, padded_efficiency, prepare, render_example, rendered_text,
                                   split_held_out, to_dataset, write_held_out)
from finetune.data.readers import DataError, RowError, read_records, source_files


def is_preference(recipe) -> bool:
    return recipe.train.method != "sft"


def prepare_for(recipe, tok, template, use_cache: bool = True) -> Prepared:
    """prepare() for SFT; data/preference.py's pipeline for the preference methods (train.method)."""
    if is_preference(recipe):
        from finetune.data.preference import prepare_preference

        return prepare_preference(recipe, tok, template, use_cache)
    return prepare(recipe, tok, template, use_cache)


def shape_for_method(recipe, train_dataset, attn_implementation=None):
    """packing.shape_for for SFT; preference rows are never packed (one pair per row of a micro-batch)."""
    from finetune.data.packing import shape_for, step_shape

    if not is_preference(recipe):
        return shape_for(recipe, train_dataset, attn_implementation)
    import os

    t = recipe.train
    return step_shape([1] * len(train_dataset), t.micro_batch_size, t.grad_accum, recipe.data.max_length, False,
                      int(os.environ.get("WORLD_SIZE", "1")))


def write_held_out_for(recipe, path, held) -> None:
    if is_preference(recipe):
        from finetune.data.preference import write_held_out as write_pairs

        return write_pairs(path, held)
    return write_held_out(path, held)

__all__ = [
    "DataError", "Encoded", "Example", "FORMAT_FIELDS", "Prepared", "ROLES", "RowError", "SHAREGPT_ROLES",
    "check_template_tokens", "check_turn_order", "data_hashes", "encode", "encode_all", "file_sha256",
    "length_stats", "load_examples", "trl_packing_efficiency", "padded_efficiency", "prepare", "prepare_for", "is_preference", "write_held_out_for", "prompt_ids",
    "read_records", "render_example", "render_ids_and_mask", "render_with_spans", "rendered_text",
    "source_files", "split_held_out", "to_dataset", "to_example", "write_held_out",
]
