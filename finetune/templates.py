"""Chat templates: one Jinja file drives training, generation and every export.

A template is an HF chat template with `{% generation %}` around each assistant reply *including* its
end-of-turn token, so the assistant-only loss mask comes from the template itself and the end token is
supervised. A comment header names the models it is for, its end-of-turn token and the special tokens it
needs:

    {#- finetune
    models: ...
    end_of_turn: <|im_end|>        # or eos_token
    requires: [<|im_start|>, <|im_end|>]
    -#}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from finetune.errors import UserError


class TemplateError(UserError, ValueError):
    """A template that cannot be used as asked (missing, or `tokenizer` on a tokenizer without one)."""


TOKENIZER_TEMPLATE = "tokenizer"
_HEADER = re.compile(r"^\{#-?\s*finetune\s*\n(.*?)\n\s*-?#\}", re.S)


def templates_dir() -> Path:
    """data_templates/ next to the package (editable install / checkout), else inside the installed package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "data_templates", here / "data_templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("data_templates/ not found next to the finetune package; reinstall finetune")


def available_templates() -> list[str]:
    return sorted(p.stem for p in templates_dir().glob("*.jinja"))


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    """The Jinja text, exactly as it goes into tokenizer_config.json / GGUF / Modelfile."""
    end_of_turn: str = "eos_token"
    """The literal end-of-turn token, or `eos_token` for the tokenizer's EOS."""
    requires: tuple[str, ...] = field(default_factory=tuple)
    models: str = ""
    alternating: bool = False
    """The format has no way to show two turns of the same role in a row (e.g. [INST] templates)."""

    @property
    def has_generation_markers(self) -> bool:
        return "{% generation" in self.source or "{%- generation" in self.source

    def end_token(self, tokenizer) -> str:
        return tokenizer.eos_token if self.end_of_turn == "eos_token" else self.end_of_turn

    def stop_tokens(self, tokenizer) -> list[str]:
        """Tokens that end a reply at inference: the end-of-turn token, and EOS."""
        out = [self.end_token(tokenizer)]
        if tokenizer.eos_token and tokenizer.eos_token not in out:
            out.append(tokenizer.eos_token)
        return out


def _parse(name: str, text: str) -> ChatTemplate:
    meta = {}
    m = _HEADER.match(text)
    if m:
        meta = yaml.safe_load(m.group(1)) or {}
    return ChatTemplate(
        name=name,
        source=text,
        end_of_turn=str(meta.get("end_of_turn", "eos_token")),
        requires=tuple(str(t) for t in meta.get("requires", []) or []),
        models=str(meta.get("models", "")),
        alternating=bool(meta.get("alternating", False)),
    )


def _template_path(name: str) -> Path:
    if name.endswith(".jinja") or "/" in name:
        return Path(name)
    return templates_dir() / f"{name}.jinja"


def template_problem(name: str) -> str | None:
    """Why `data.template` cannot be used, or None. Checked at recipe validation, before any model loads."""
    if name == TOKENIZER_TEMPLATE:
        return None
    path = _template_path(name)
    if not path.is_file():
        if name.endswith(".jinja") or "/" in name:
            return "template file not found"
        return f"unknown template; choose one of {available_templates()} or `tokenizer`, or give a path to a .jinja file"
    return None


@lru_cache(maxsize=32)
def _load_file(path: str, mtime: float) -> ChatTemplate:
    p = Path(path)
    return _parse(p.stem, p.read_text(encoding="utf-8"))


def load_template(name: str, tokenizer=None) -> ChatTemplate:
    """Load a template by name, path, or `tokenizer` (the tokenizer's own chat template)."""
    if name == TOKENIZER_TEMPLATE:
        source = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if not source:
            raise TemplateError("data.template: `tokenizer` was asked for, but the tokenizer has no chat template; "
                             "choose a template from data_templates/")
        return ChatTemplate(name="tokenizer", source=source, end_of_turn=_guess_end_token(source, tokenizer))
    path = _template_path(name)
    if not path.is_file():
        raise TemplateError(f"data.template: {template_problem(name)} (got {name!r})")
    return _load_file(str(path.resolve()), path.stat().st_mtime)


def saved_template(name: str, tokenizer) -> ChatTemplate:
    """A run's template as saved with its adapter or merged model: exactly the text training rendered (even if the
    .jinja file has changed or moved since), with the metadata of its header comment. Merge, export and eval all
    read it this way, so every stage uses the same template and end-of-turn token."""
    if name == TOKENIZER_TEMPLATE or not getattr(tokenizer, "chat_template", None):
        return load_template(name, tokenizer)  # a model's own template: end token found by probing
    return _parse(Path(name).stem, tokenizer.chat_template)


def _guess_end_token(source: str, tokenizer) -> str:
    """For a model's own template: the special token that closes an assistant turn, else EOS."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "PROBEREPLY"}]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=source, tokenize=False)
    except Exception:  # a template that cannot render a plain turn is caught later, with its row
        return "eos_token"
    after = text.split("PROBEREPLY", 1)[-1]
    for tok in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if after.startswith(tok):
            return "eos_token" if tok == tokenizer.eos_token else tok
    return "eos_token"


def check_tokenizer_supports(template: ChatTemplate, tokenizer) -> list[str]:
    """Special tokens the template needs that the tokenizer would split into pieces."""
    needed = list(template.requires)
    if template.end_of_turn != "eos_token":
        needed.append(template.end_of_turn)
    missing = []
    for tok in dict.fromkeys(needed):
        ids = tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            missing.append(tok)
    return missing
