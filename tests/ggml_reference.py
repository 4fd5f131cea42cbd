"""llama.cpp's reference quantizers (``ggml-quants.c``), compiled from a llama.cpp source tree.

llama-cpp-python ships no C sources, so the byte-equality tests and ``benchmarks/gguf_bench.py``
build the one file that holds ``quantize_row_<type>_ref`` themselves: set ``LORAQ_LLAMA_CPP_SRC``
to a llama.cpp checkout (the folder holding ``ggml/``). A few ggml symbols the file links
against are stubbed; the reference functions never call them.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: Environment variable naming the llama.cpp source tree.
SOURCE_ENV = "LORAQ_LLAMA_CPP_SRC"
_STUBS = """#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char *f, int l, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int t, long n) { abort(); }
const char *ggml_type_name(int t) { return "?"; }
size_t ggml_type_size(int t) { abort(); }
"""


def source_file() -> Path | None:
    """``ggml/src/ggml-quants.c`` of ``$LORAQ_LLAMA_CPP_SRC``, or None."""
    root = os.environ.get(SOURCE_ENV)
    path = Path(root) / "ggml" / "src" / "ggml-quants.c" if root else None
    return path if path is not None and path.is_file() else None


def build(out_dir: Path, flags: tuple[str, ...] = ("-O3",)) -> ctypes.CDLL:
    """Compile ggml-quants.c into ``out_dir`` and load it. No FMA contraction: llama.cpp builds
    this file in ggml-base, without ``-march`` on x86-64, so its products and sums round apart."""
    source = source_file()
    if source is None:
        raise FileNotFoundError(f"set {SOURCE_ENV} to a llama.cpp source tree")
    stubs = out_dir / "ggml_stubs.c"
    stubs.write_text(_STUBS)
    lib = out_dir / "libggml_quants_ref.so"
    inc = [f"-I{source.parent.parent / 'include'}", f"-I{source.parent}"]
    cmd = ["cc", *flags, "-fPIC", "-shared", "-ffp-contract=off", *inc, str(source), str(stubs)]
    subprocess.run([*cmd, "-o", str(lib), "-lm"], check=True, timeout=600)
    return ctypes.CDLL(str(lib))


def quantize(lib: ctypes.CDLL, x: torch.Tensor, name: str, out: torch.Tensor, threads: int = 1):
    """``quantize_row_<name>_ref`` over float32 ``x`` into uint8 ``out``, rows split over
    ``threads`` (as llama-quantize splits a tensor's rows)."""
    c_name = name[:-1] + "K" if name.endswith("_k") else name
    fn = getattr(lib, f"quantize_row_{c_name}_ref")
    x = x.contiguous()
    rows, cols = x.shape
    row_bytes = out.numel() // rows

    def run(lo: int, hi: int) -> None:
        src = ctypes.c_void_p(x.data_ptr() + lo * cols * 4)
        dst = ctypes.c_void_p(out.data_ptr() + lo * row_bytes)
        fn(src, dst, ctypes.c_int64((hi - lo) * cols))

    if threads <= 1:
        run(0, rows)
        return out
    step = -(-rows // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda lo: run(lo, min(lo + step, rows)), range(0, rows, step)))
    return out
