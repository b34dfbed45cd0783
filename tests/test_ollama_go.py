"""The Ollama TEMPLATE that `finetune export --format ollama` writes, rendered by Go's own text/template.

For every bundled template: translate the Jinja to Go (finetune/export/ollama.py), put it in a Modelfile and
read it back, render conversations with the fields Ollama passes (tests/go/ollama_render.go), and compare with
the Jinja rendering training and `finetune generate` use. Skips where `go` is absent (CI installs golang-go).
"""

from __future__ import annotations

import pytest

import ollama_go
from finetune.export.ollama import TEST_CONVERSATIONS, modelfile, read_template, translate
from finetune.templates import available_templates, load_template

pytestmark = pytest.mark.skipif(ollama_go.go_binary() is None, reason=ollama_go.NO_GO)

SYSTEM = {"role": "system", "content": "You answer briefly."}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "one user turn": [u("What is red?")],
    "system and one user turn": [SYSTEM, u("What is red?")],
    "multi-turn": [u("Hi"), a("Hello!"), u("How are you?\nFine?")],
    "system and multi-turn": [SYSTEM, u("Hi"), a("Hello."), u("What is green?"), a("A colour."), u("Bye")],
    # whitespace at the edges (Go's {{- trim markers must not eat it), braces, quotes, unicode
    "awkward text": [u("  spaced \n"), a('{{ .Content }} "quoted" \\ 😀'), u("naïve\n\n\tend ")],
}


def _jinja(tokenizer, source):
    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


def test_go_oracle_is_go():
    """The renderer is Go's engine: Go-only syntax works, and trim markers behave as in Go."""
    tmpl = '{{- range $i, $m := .Messages }}{{ if $i }},{{ end }}{{ printf "%q" $m.Content }}{{ end }} \n {{- .System }}'
    assert ollama_go.render(tmpl, [SYSTEM, u("a\nb")]) == '"You answer briefly.","a\\nb"You answer briefly.'


@pytest.mark.parametrize("name", available_templates())
def test_bundled_template_renders_in_go_as_in_jinja(name, tiny_tokenizer):
    template = load_template(name)
    render = _jinja(tiny_tokenizer, template.source)
    go = translate(render)  # raises TemplateTranslationError for a template it cannot express
    mf = modelfile("run-f16.gguf", go, template.stop_tokens(tiny_tokenizer), None, "run")
    assert read_template(mf) == go  # the TEMPLATE Ollama reads is the one translated
    for what, conv in [*CONVERSATIONS.items(), *((f"translate's own check {i}", c) for i, c in
                                                 enumerate(TEST_CONVERSATIONS))]:
        assert ollama_go.render(go, conv) == render(conv, True), f"{name}: {what}"


def test_a_wrong_translation_is_caught(tiny_tokenizer):
    """The oracle can fail: a TEMPLATE that drops the system message renders differently in Go."""
    render = _jinja(tiny_tokenizer, load_template("chatml").source)
    go = translate(render).replace("{{ .Content }}", "", 1)
    conv = CONVERSATIONS["system and one user turn"]
    assert ollama_go.render(go, conv) != render(conv, True)
