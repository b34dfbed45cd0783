"""Tokenising a conversation: ids + labels, the assistant-only mask taken from the template."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.data.formats import Example
from finetune.data.readers import DataError
from finetune.templates import ChatTemplate


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
    from finetune import internals

    render_jinja_template = internals.get("transformers.utils.chat_template_utils.render_jinja_template")

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
