"""Quantized GGUFs made by llama.cpp's own quantizer (`llama_model_quantize`, the function behind its
`llama-quantize` tool), from the f16 GGUF our writer produces: the bytes are what llama.cpp's tool writes, and
nothing is compiled by hand.

Why not quantize in Python: k-quants choose per-tensor types (q4_k_m keeps some attn_v/ffn_down rows in q6_k,
falls back for rows that are not whole 256-value super-blocks, ...). Copying those rules would drift from
llama.cpp with every release; calling it cannot.

Memory: llama.cpp reads the input tensor by tensor and writes each quantized tensor out before the next, so the
child never holds a second copy of the weights; its peak RSS is measured and recorded next to the file size.
The quantizer runs in a child process (finetune.isolate): a native crash is one line, never a dead export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune import isolate

log = logging.getLogger("finetune")

RUNTIME = "llama-cpp-python"

WRITER_TYPES = ("f32", "f16", "bf16")
"""Written by our own GGUF writer (finetune.export.gguf) straight from merged/."""

LLAMA_QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
"""Made by llama.cpp from the f16 GGUF. The IQ1/IQ2/IQ3 types are left out: llama.cpp needs an importance
matrix for them (computed by running the model on calibration text), which is not this command's job."""

ALL_TYPES = WRITER_TYPES + tuple(LLAMA_QUANT_TYPES)


class QuantizeError(Exception):
    """llama.cpp's quantizer returned an error (its messages are in the log)."""


def check_types(types: list[str]) -> list[str]:
    """The requested types, deduplicated, in the order asked; unknown ones are one line listing the valid ones."""
    bad = [t for t in types if t not in ALL_TYPES]
    if bad:
        raise ValueError(f"--gguf-type: must be one of {', '.join(ALL_TYPES)} (got {bad[0]!r})")
    if not types:
        raise ValueError(f"--gguf-type: give at least one of {', '.join(ALL_TYPES)}")
    return list(dict.fromkeys(types))


def source_type(types: list[str]) -> str:
    """The type our writer produces for the quantizer: f16, as llama.cpp's own convert-then-quantize flow does
    (f32 when that is the only writer type asked for)."""
    return "f32" if "f32" in types and "f16" not in types else "f16"


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    across exec, so a child started by a 1 GiB parent would report the parent's peak."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _quantize_in_child(src: str, dst: str, ftype_name: str, nthread: int) -> dict:
    """Runs in the child: llama_model_quantize, and the child's peak resident memory."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    before = peak_rss()  # the interpreter and its imports
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return {"returncode": int(rc), "rss_before_bytes": before,
            "peak_rss_bytes": peak_rss()}


def quantize_gguf(src: Path, dst: Path, gguf_type: str, nthread: int = 0) -> dict:
    """Quantize `src` (an f16/f32 GGUF) to `dst` with llama.cpp; published atomically. Returns
    {"peak_rss_bytes", "rss_before_bytes" (the child before quantizing), "input_bytes", "seconds"}. Raises isolate.Crashed on a native crash, QuantizeError on rc != 0."""
    import time

    from finetune.rundir import publishing_file

    started = time.time()
    with publishing_file(dst) as tmp:
        out = isolate.call(_quantize_in_child, str(src), str(tmp), LLAMA_QUANT_TYPES[gguf_type], nthread,
                           what=f"quantizing {Path(src).name} to {gguf_type}", runtime=RUNTIME, tag="quantize")
        if out["returncode"] != 0:
            raise QuantizeError(f"llama.cpp's quantizer returned {out['returncode']} for {gguf_type} "
                                f"({Path(src).name})")
    return {"peak_rss_bytes": out["peak_rss_bytes"], "rss_before_bytes": out["rss_before_bytes"],
            "input_bytes": Path(src).stat().st_size, "seconds": round(time.time() - started, 2)}


def gguf_stats(path: Path) -> dict:
    """File size, weights, bits per weight (file bits over the parameters it stores) and the tensor types."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    n = sum(int(t.n_elements) for t in reader.tensors)
    size = Path(path).stat().st_size
    types = Counter(t.tensor_type.name.lower() for t in reader.tensors)
    return {"file_bytes": size, "parameters": n, "bits_per_weight": 8 * size / max(n, 1),
            "tensor_types": dict(sorted(types.items()))}
