"""An Ollama Modelfile beside the GGUF: the run's chat template translated to Go's text/template, and stops.

Ollama renders prompts with Go templates, not Jinja. We do not parse the Jinja: we *probe* it. Rendering
conversations whose contents are unique markers shows the text each role puts before and after its content
(and where a system message goes); a Go template is assembled from those pieces, then rendered on test
conversations and compared with the Jinja rendering. A template that does not decompose this way is reported,
never silently mistranslated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from finetune.errors import UserError

SYS, U1, A1, U2, A2 = "\x02SYS\x03", "\x02U1\x03", "\x02A1\x03", "\x02U2\x03", "\x02A2\x03"


class TemplateTranslationError(UserError):
    """The chat template cannot be expressed as an Ollama template by role prefixes and suffixes."""


@dataclass(frozen=True)
class Pieces:
    """A chat template decomposed into literal text around each message's content."""

    default_preamble: str
    """Text before the first message when there is no system message (BOS, a default system prompt)."""
    sys_pre: str
    sys_post: str
    sys_in_first_user: bool
    """The system text goes inside the first user turn (Llama-2/Mistral style) rather than before it."""
    user_pre: str
    user_post: str
    asst_pre: str
    asst_post: str
    gen_prompt: str


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateTranslationError(f"{what}: expected {prefix!r} at the start of {text!r}")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if suffix and not text.endswith(suffix):
        raise TemplateTranslationError(f"{what}: expected {suffix!r} at the end of {text!r}")
    return text[: len(text) - len(suffix)] if suffix else text


def _split(text: str, markers: list[str]) -> list[str]:
    parts, rest = [], text
    for m in markers:
        if rest.count(m) != 1:
            raise TemplateTranslationError(f"the template does not show each message's content exactly once ({m!r})")
        before, rest = rest.split(m)
        parts.append(before)
    return parts + [rest]


def decompose(render) -> Pieces:
    """`render(messages, add_generation_prompt) -> str` is the Jinja template; find its pieces."""
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    p0, p1, p2, p3, p4 = _split(render([u(U1), a(A1), u(U2), a(A2)], False), [U1, A1, U2, A2])
    if p1 != p3:
        raise TemplateTranslationError("the text between a user turn and its reply differs from turn to turn")
    asst_post = p4
    user_pre = _strip_prefix(p2, asst_post, "between turns")
    default_preamble = _strip_suffix(p0, user_pre, "first user turn")
    q0, q1 = _split(render([u(U1)], False), [U1])
    user_post = q1
    asst_pre = _strip_prefix(p1, user_post, "before the reply")
    g0, g1 = _split(render([u(U1)], True), [U1])
    gen_prompt = _strip_prefix(g1, user_post, "generation prompt")

    s0, s1, s2 = _split(render([{"role": "system", "content": SYS}, u(U1), a(A1)], False), [SYS, U1])
    if s1.endswith(user_pre) and not (user_pre == "" and s0.startswith(default_preamble) and default_preamble):
        # The system message is a block of its own before the first user turn.
        return Pieces(default_preamble, s0, s1[: len(s1) - len(user_pre)], False,
                      user_pre, user_post, asst_pre, asst_post, gen_prompt)
    # Otherwise it sits inside the first user turn, after the user prefix.
    head = _strip_prefix(s0, default_preamble + user_pre, "system inside the first user turn")
    return Pieces(default_preamble, head, s1, True, user_pre, user_post, asst_pre, asst_post, gen_prompt)


def _lit(text: str) -> str:
    """A Go string literal action for `text` (JSON escapes are valid Go escapes), so whitespace is exact."""
    return "{{- " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(p: Pieces) -> str:
    """The Ollama TEMPLATE for these pieces (Go text/template over .Messages)."""
    out = []
    if p.sys_in_first_user:
        out.append('{{- $system := "" }}{{- $first := true }}')
    if p.default_preamble:
        out.append('{{- if ne (index .Messages 0).Role "system" }}' + _lit(p.default_preamble) + "{{ end }}")
    out.append("{{- range .Messages }}")
    if p.sys_in_first_user:
        out.append('{{- if eq .Role "system" }}{{ $system = .Content }}')
        if p.default_preamble:
            out.append(_lit(p.default_preamble))
        out.append('{{- else if eq .Role "user" }}' + _lit(p.user_pre)
                   + "{{ if and $first $system }}" + _lit(p.sys_pre) + "{{ $system }}" + _lit(p.sys_post) + "{{ end }}"
                   + "{{ .Content }}" + _lit(p.user_post) + "{{ $first = false }}")
    else:
        out.append('{{- if eq .Role "system" }}' + _lit(p.sys_pre) + "{{ .Content }}" + _lit(p.sys_post))
        out.append('{{- else if eq .Role "user" }}' + _lit(p.user_pre) + "{{ .Content }}" + _lit(p.user_post))
    out.append('{{- else if eq .Role "assistant" }}' + _lit(p.asst_pre) + "{{ .Content }}" + _lit(p.asst_post))
    out.append("{{- end }}")
    out.append("{{- end }}" + _lit(p.gen_prompt))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# A renderer for the Go template subset go_template() writes, to check the translation against Jinja.

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go(template: str, messages: list[dict]) -> str:
    """Render `template` as Go's text/template would, for the constructs go_template() emits (and no others)."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        tokens.append(("text", template[pos:m.start()]))
        tokens.append(("act", m.group(2), bool(m.group(1)), bool(m.group(3))))
        pos = m.end()
    tokens.append(("text", template[pos:]))
    # Trim markers remove the whitespace of the neighbouring text, as in Go.
    for i, t in enumerate(tokens):
        if t[0] == "act":
            if t[2] and i > 0:
                tokens[i - 1] = ("text", tokens[i - 1][1].rstrip())
            if t[3] and i + 1 < len(tokens):
                tokens[i + 1] = ("text", tokens[i + 1][1].lstrip())
    body, rest = _parse(tokens, 0)
    if rest != len(tokens):
        raise ValueError("unbalanced {{ end }}")
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    out: list[str] = []
    _run(body, {"$": root}, root, out)
    return "".join(out)


def _parse(tokens, i, stop=("end",)):
    nodes = []
    while i < len(tokens):
        t = tokens[i]
        if t[0] == "text":
            nodes.append(("text", t[1]))
            i += 1
            continue
        act = t[1]
        head = act.split()[0] if act else ""
        if head in ("end", "else"):
            return nodes, i
        if head == "if":
            branches, i = [], i
            cond = act[3:].strip()
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((cond, body))
                nxt = tokens[i][1]
                if nxt == "end":
                    break
                cond = nxt[len("else if"):].strip() if nxt.startswith("else if") else "true"
            nodes.append(("if", branches))
            i += 1
            continue
        if head == "range":
            body, i = _parse(tokens, i + 1)
            nodes.append(("range", act[len("range"):].strip(), body))
            i += 1
            continue
        nodes.append(("act", act))
        i += 1
    return nodes, i


_TOK = re.compile(r'\(|\)|"(?:\\.|[^"\\])*"|[^\s()]+')
_FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *v: all(v),
          "or": lambda *v: any(v), "not": lambda v: not v, "len": len,
          "index": lambda seq, i: seq[i]}


def _value(expr: str, scope: dict, dot):
    toks = [(m.group(), m.start(), m.end()) for m in _TOK.finditer(expr)]
    val, i = _pipeline(toks, 0, scope, dot)
    if i != len(toks):
        raise ValueError(f"unsupported Go template expression {expr!r}")
    return val


def _pipeline(toks, i, scope, dot):
    if toks[i][0] in _FUNCS:
        fn, args, i = _FUNCS[toks[i][0]], [], i + 1
        while i < len(toks) and toks[i][0] != ")":
            v, i = _term(toks, i, scope, dot)
            args.append(v)
        return fn(*args), i
    return _term(toks, i, scope, dot)


def _fields(val, chain: str):
    for f in [x for x in chain.split(".") if x]:
        val = val[f]
    return val


def _term(toks, i, scope, dot):
    t, _, end = toks[i]
    if t == "(":
        val, i = _pipeline(toks, i + 1, scope, dot)
        if toks[i][0] != ")":
            raise ValueError("unbalanced parenthesis")
        end = toks[i][2]
        i += 1
        # `(x).Field`: a field chain written right after the parenthesis
        if i < len(toks) and toks[i][1] == end and toks[i][0].startswith("."):
            val, i = _fields(val, toks[i][0]), i + 1
        return val, i
    if t.startswith('"'):
        return json.loads(t), i + 1
    if t in ("true", "false"):
        return t == "true", i + 1
    if t.isdigit():
        return int(t), i + 1
    if t.startswith("$"):
        name, dotpos, chain = t.partition(".")
        return _fields(scope[name], chain), i + 1
    if t.startswith("."):
        return _fields(dot, t), i + 1
    raise ValueError(f"unsupported Go template term {t!r}")


def _run(nodes, scope, dot, out):
    for n in nodes:
        if n[0] == "text":
            out.append(n[1])
        elif n[0] == "if":
            for cond, body in n[1]:
                if cond == "true" or _value(cond, scope, dot):
                    _run(body, scope, dot, out)
                    break
        elif n[0] == "range":
            for item in _value(n[1], scope, dot):
                _run(n[2], scope, item, out)
        else:
            act = n[1]
            m = re.match(r"^(\$\w+)\s*(:?=)\s*(.+)$", act)
            if m:
                scope[m.group(1)] = _value(m.group(3), scope, dot)
            else:
                val = _value(act, scope, dot)
                out.append(str(val))


# ---------------------------------------------------------------------------------------------
# The Modelfile


TEST_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "How are you?\nFine?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


def translate(render) -> str:
    """Jinja template (as a render function) -> Go template, checked on test conversations."""
    go = go_template(decompose(render))
    for conv in TEST_CONVERSATIONS:
        want, got = render(conv, True), render_go(go, conv)
        if want != got:
            raise TemplateTranslationError(f"the translated template renders {got!r} where the chat template "
                                           f"renders {want!r}")
    return go


def modelfile(gguf_name: str, go_tmpl: str | None, stops: list[str], system: str | None, run_name: str,
              note: str | None = None, adapter: str | None = None) -> str:
    """`adapter`: a LoRA GGUF applied on top of FROM (Ollama's ADAPTER line; FROM is then the base it was
    trained on)."""
    lines = [
        f"# Ollama Modelfile for {run_name}, written by `finetune export`.",
        f"#   ollama create {run_name} -f {'Modelfile.adapter' if adapter else 'Modelfile'}     (run it in this "
        "directory)",
        f"#   ollama run {run_name}",
        f"FROM ./{gguf_name}",
    ]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if go_tmpl is not None:
        if '"""' in go_tmpl:
            raise TemplateTranslationError('the template contains """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{go_tmpl}"""')
    elif note:
        lines.append(f"# TEMPLATE not written: {note}")
    if system:
        lines.append(f"SYSTEM {json.dumps(system, ensure_ascii=False)}")
    for s in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def read_template(modelfile_text: str) -> str | None:
    m = re.search(r'^TEMPLATE """(.*?)"""', modelfile_text, re.S | re.M)
    return m.group(1) if m else None
