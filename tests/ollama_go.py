"""Render an Ollama TEMPLATE with Go's own text/template (tests/go/ollama_render.go), as Ollama would.

The oracle for finetune.export.ollama's translation: Ollama runs Go templates, so the check is Go itself, not a
Python re-implementation of it. Needs the `go` toolchain (CI: `apt-get install -y golang-go`); the binary is
built once per test session into a temporary directory, offline (the program uses only Go's standard library).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).parent / "go" / "ollama_render.go"
NO_GO = "the `go` toolchain is not installed (CI: apt-get update && apt-get install -y golang-go)"


@lru_cache(maxsize=1)
def go_binary() -> Path | None:
    """The built renderer, or None when there is no `go` on PATH."""
    go = shutil.which("go")
    if go is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="ollama_go_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    env = {**os.environ, "GOCACHE": str(tmp / "cache"), "GOPATH": str(tmp / "gopath"), "GO111MODULE": "off",
           "GOFLAGS": "", "GOPROXY": "off", "CGO_ENABLED": "0"}
    out = tmp / "ollama_render"
    subprocess.run([go, "build", "-o", str(out), str(SOURCE)], env=env, check=True, capture_output=True,
                   timeout=300)
    return out


def ollama_fields(messages: list[dict]) -> dict:
    """The fields Ollama's template.Execute gives a template that uses .Messages: every system message joined
    into .System, consecutive messages of one role merged with a blank line (its `collate`), .Response empty."""
    system, collated = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(system), "Messages": collated, "Prompt": "", "Response": ""}


def render(template: str, messages: list[dict]) -> str:
    """What Ollama's prompt for `messages` is under this TEMPLATE."""
    binary = go_binary()
    if binary is None:
        raise RuntimeError(NO_GO)
    stdin = json.dumps({"Template": template, **ollama_fields(messages)})
    res = subprocess.run([str(binary)], input=stdin.encode(), capture_output=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"Go's text/template rejected the template: {res.stderr.decode(errors='replace')}")
    return res.stdout.decode("utf-8")
