"""Dequantize speed: loraq's compiled CPU kernel vs its pure-PyTorch path vs bitsandbytes (CPU).

Run (emulating the 2-core CI machine):

    taskset -c 0,1 python benchmarks/dequantize.py --threads 2

A (rows x cols) weight in NF4 with double quantization, dequantized to float32 and to bfloat16
(bitsandbytes from a tensor quantized in that dtype, so it writes that dtype directly), and the
8-bit blockwise format. "compiled" and "pure" return a fresh tensor, as bitsandbytes does
(large fresh results are advised onto huge pages, see ``loraq.native.pages``); "reused"
writes into one buffer kept across calls, as loraq's quantized layers do (bitsandbytes' CPU
backend has no ``out=``). Calls are interleaved round by round in a shuffled order; each figure
is the median over rounds, reported as speed relative to bitsandbytes (higher is faster).
Target: compiled >= 1.5x bitsandbytes in float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from timing import interleaved, machine_line

from loraq.native import dequant as cpu
from loraq.quant import dequantize_4bit, dequantize_8bit, quantize_4bit, quantize_8bit


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per call of each contender."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def pure(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the compiled kernel bypassed (loraq's pure-PyTorch path)."""

    def call() -> object:
        saved = cpu._library
        cpu._library = lambda: None
        try:
            return fn()
        finally:
            cpu._library = saved

    return call


def report(title: str, med: dict[str, float], n: int) -> None:
    print(f"\n{title}")
    ref = med.get("bitsandbytes")
    for name, sec in med.items():
        ratio = f"  speed vs bitsandbytes {ref / sec:5.2f}x" if ref else ""
        print(f"  {name:<15} {sec * 1e3:8.2f} ms  {n / sec / 1e6:8.1f} M/s{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"compiled kernel: {cpu.available()}, rounds {args.rounds}")
    torch.manual_seed(0)
    weight = torch.randn(args.rows, args.cols) * 0.02
    n = weight.numel()
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
        print("bitsandbytes not installed: loraq only")
    for dtype in (torch.float32, torch.bfloat16):
        w = weight.to(dtype)
        q = quantize_4bit(w, 64, "nf4", double_quant=True)
        buf = torch.empty(n, dtype=dtype)
        fns = {
            "loraq compiled": lambda q=q, d=dtype: dequantize_4bit(q, d),
            "loraq pure": pure(lambda q=q, d=dtype: dequantize_4bit(q, d)),
            "loraq reused": lambda q=q, b=buf: q.dequantize_range(0, n, b),
        }
        if bnbf is not None:
            packed, state = bnbf.quantize_4bit(
                w, blocksize=64, quant_type="nf4", compress_statistics=True
            )
            fns["bitsandbytes"] = lambda p=packed, s=state: bnbf.dequantize_4bit(p, s)
        report(f"NF4 + double quant -> {dtype}", medians(interleaved(fns, args.rounds)), n)
    q8 = quantize_8bit(weight, 256)
    fns = {
        "loraq compiled": lambda: dequantize_8bit(q8, torch.float32),
        "loraq pure": pure(lambda: dequantize_8bit(q8, torch.float32)),
    }
    if bnbf is not None:
        codes, state8 = bnbf.quantize_blockwise(weight, blocksize=256)
        fns["bitsandbytes"] = lambda: bnbf.dequantize_blockwise(codes, state8)
    report("8-bit blockwise -> float32", medians(interleaved(fns, args.rounds)), n)
    print(machine_line())


if __name__ == "__main__":
    main()
