"""Benchmark loraq's 4-bit quantization and Linear4bit against bitsandbytes and a dense layer (CPU).

Run (emulating the 2-core CI machine):

    taskset -c 0,1 python benchmarks/quant.py --threads 2

What is timed, interleaved round by round in a shuffled order so that background load hits every
contender alike; each figure is the median over rounds (the minimum is printed too):

* quantize / dequantize a 4096x4096 weight, NF4 with double quantization, float32 and bfloat16
  input, loraq vs ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit``;
* a linear layer on x of shape (512, 4096), float32 compute: forward (no grad) and forward +
  backward (x requires grad), for loraq's ``Linear4bit``, ``bnb.nn.Linear4bit`` and a dense
  ``nn.Linear``.

bitsandbytes caveat (reference/formats.md §2): on CPU, ``bnb.nn.Linear4bit.forward`` in eval mode
without grad repacks ``weight.data`` in place into a CPU-specific layout on the first call; the
warm-up call absorbs that, and its no-grad forward is measured in eval mode after it.

Targets (2 cores): loraq quantize >= 3x bnb, dequantize >= 1x bnb, loraq 4-bit forward <= 1.1x
the dense forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import interleaved, machine_line  # noqa: E402
from torch import nn  # noqa: E402

from loraq.layers.quantized import Linear4bit  # noqa: E402
from loraq.quant import dequantize_4bit, quantize_4bit  # noqa: E402


def report(title: str, times: dict[str, list[float]], work: float, unit: str, base: str) -> None:
    """Print median/min time, throughput (``work`` units per call) and the ratio to ``base``."""
    print(f"\n{title}")
    base_median = statistics.median(times[base])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(
            f"  {name:<22} median {median * 1e3:8.2f} ms  min {min(ts) * 1e3:8.2f} ms  "
            f"{work / median / 1e6:9.1f} M{unit}/s  time vs {base}: {median / base_median:5.2f}x"
        )


def bench_quantize(rounds: int) -> None:
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    n = weight.numel()
    for dtype in (torch.float32, torch.bfloat16):
        w = weight.to(dtype)
        times = interleaved(
            {
                "bnb quantize": lambda w=w: bnbf.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=True
                ),
                "loraq quantize": lambda w=w: quantize_4bit(w, 64, "nf4", double_quant=True),
            },
            rounds,
        )
        report(f"quantize 4096x4096 {dtype} -> NF4+DQ", times, n, "param", "bnb quantize")
        ours = quantize_4bit(w, 64, "nf4", double_quant=True)
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        times = interleaved(
            {
                "bnb dequantize": lambda p=packed, s=state: bnbf.dequantize_4bit(p, s),
                "loraq dequantize": lambda q=ours: dequantize_4bit(q),
            },
            rounds,
        )
        report(f"dequantize NF4+DQ -> 4096x4096 {dtype}", times, n, "param", "bnb dequantize")


def bench_linear(rounds: int) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Linear(4096, 4096)
    dense.weight.requires_grad_(False)
    dense.bias.requires_grad_(False)
    ours = Linear4bit.from_linear(dense, "nf4", 64, double_quant=True, compute_dtype=torch.float32)

    def bnb_layer() -> nn.Module:
        layer = bnb.nn.Linear4bit(
            4096, 4096, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            dense.weight.data.clone(), requires_grad=False, quant_type="nf4"
        )
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        return layer.to("cpu")  # Params4bit quantizes on .to()

    # Separate instances: after an eval/no-grad call the CPU layout is repacked for good, and
    # that layout fails in a training forward (its in-place bias add on a graph output).
    theirs = bnb_layer().eval()
    theirs_train = bnb_layer().train()
    x = torch.randn(512, 4096)
    flops = 2 * 512 * 4096 * 4096

    def forward(layer: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return layer(x)

        return run

    times = interleaved(
        {
            "dense fp32": forward(dense),
            "bnb Linear4bit": forward(theirs),
            "loraq Linear4bit": forward(ours),
        },
        rounds,
    )
    report(
        "forward x(512,4096) @ W(4096,4096)^T, fp32 compute, no grad",
        times,
        flops,
        "flop",
        "dense fp32",
    )

    xg = x.clone().requires_grad_(True)
    grad = torch.randn(512, 4096)

    def train_step(layer: nn.Module) -> Callable[[], object]:
        def run() -> object:
            xg.grad = None
            layer(xg).backward(grad)
            return xg.grad

        return run

    times = interleaved(
        {
            "dense fp32": train_step(dense),
            "bnb Linear4bit": train_step(theirs_train),
            "loraq Linear4bit": train_step(ours),
        },
        rounds,
    )
    report(
        "forward + backward (grad wrt x only), fp32 compute",
        times,
        3 * flops / 2,
        "flop",
        "dense fp32",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (CI has 2 cores)"
    )
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds per benchmark")
    parser.add_argument("--only", choices=("quant", "linear"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"rounds {args.rounds}")
    if args.only in (None, "quant"):
        bench_quantize(args.rounds)
    if args.only in (None, "linear"):
        bench_linear(args.rounds)
    print(machine_line())


if __name__ == "__main__":
    main()
