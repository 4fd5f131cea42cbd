"""DPO with LoRA: ``loraq`` (``training.method: dpo``) vs TRL's ``DPOTrainer`` + PEFT.

    taskset -c 0,1 python benchmarks/dpo.py [--steps 6] [--repeats 2] [--threads 2]

Workload: a random-weight Llama built in code (hidden 256, FFN 688, 4 layers, 8 query / 4
key-value heads, the tests' 259-symbol byte tokenizer), 64 preference pairs (prompt ~60 tokens,
answers ~30-90 tokens), batch 4 pairs, max_length 256, LoRA r=16 / alpha 32 / dropout 0 on
every linear layer, float32, AdamW at a constant lr, gradient norm clipped to 1.0. Both take the
reference log-probs from the same model with the adapters disabled, once per batch.

* loraq: :func:`loraq.train.loop.setup`, then ``train_step`` per step (timed by the step itself).
* TRL: ``DPOTrainer(model, peft_config=LoraConfig(...))``, ``trainer.train()``, each step timed
  by a callback from ``on_step_begin`` to ``on_step_end``.

Each run is a child process (loraq, TRL, loraq, TRL, ...), so background load hits both alike
and each has its own memory high-water mark. Step time: median over the steps after the first
(warm-up) of every run. Peak RSS: the process's ``VmHWM`` at the end, and the rise of the mark
over the RSS just before the first step (the training's own memory: activations, gradients,
optimizer state; the process's baseline differs, TRL imports datasets and accelerate).
Printed as ratios TRL / loraq (above 1: loraq is faster / smaller), with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from loraq.core.probes import read_proc_status, reset_peak_rss  # noqa: E402
from tiny_lm import byte_tokenizer  # noqa: E402  (the tests' byte-level tokenizer)

PAIRS, BATCH, MAX_LEN, R, ALPHA, LR, BETA = 64, 4, 256, 16, 32, 5e-4, 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = "the a little dog cat ran to park and saw big red ball tree happy sun day played".split()


def build_folder(path: Path) -> Path:
    """Save the random-weight Llama and its tokenizer as a transformers folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=260, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def write_pairs(path: Path) -> Path:
    """Pairs where the chosen answer is one short sentence and the rejected one rambles."""
    rng = random.Random(0)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = [
        {
            "prompt": f"Answer in one sentence: {words(8, 12)}?\n",
            "chosen": words(6, 10) + ".",
            "rejected": words(12, 20) + ", and " + words(4, 8),
        }
        for _ in range(PAIRS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def loraq_child(folder: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    from loraq.train import loop
    from loraq.train.config import from_dict

    cfg = from_dict({
        "model": {"path": str(folder), "task": "causal-lm"},
        "data": {"train": str(data), "max_length": MAX_LEN},
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": TARGETS,
                 "compute_dtype": "float32"},
        "training": {
            "method": "dpo", "beta": BETA, "max_steps": args.steps, "batch_size": BATCH,
            "lr": LR, "schedule": "constant", "output_dir": str(out), "eval_before": False,
            "num_threads": args.threads, "progress": False, "overwrite": True,
        },
    })  # fmt: skip
    session = loop.setup(cfg, log=lambda line: None)
    start_rss = _start_peak()
    times = [loop.train_step(session).seconds for _ in range(args.steps)]
    return _report(times, start_rss)


def trl_child(folder: Path, data: Path, out: Path, args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="constant", max_steps=args.steps, beta=BETA, max_length=MAX_LEN,
        bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**6, gradient_checkpointing=False, disable_tqdm=True, weight_decay=0.0,
    )  # fmt: skip
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    times: list[float] = []
    start: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if "rss" not in start:
                start["rss"] = _start_peak()
            start["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - start["t"])

    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(str(folder)), peft_config=lora,
        callbacks=[StepTimer()],
    )  # fmt: skip
    trainer.train()
    return _report(times, start["rss"])


def _start_peak() -> int:
    reset_peak_rss()
    return read_proc_status("VmRSS") or 0


def _report(times: list[float], start_rss: int) -> dict:
    peak = read_proc_status("VmHWM") or 0
    return {"step_s": statistics.median(times[1:]), "peak_rss": peak, "rise": peak - start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["loraq", "trl"])
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        root = Path(args.root)
        run = loraq_child if args.child == "loraq" else trl_child
        result = run(root / "model", root / "pairs.jsonl", root / f"run_{args.child}", args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    root = Path(tempfile.mkdtemp(prefix="loraq_dpo_bench_"))
    build_folder(root / "model")
    write_pairs(root / "pairs.jsonl")
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {"loraq": [], "trl": []}
    for _ in range(args.repeats):
        for who in ("loraq", "trl"):
            cmd = [sys.executable, __file__, "--child", who, "--root", str(root)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            results[who].append(json.loads(line.removeprefix("RESULT ")))
    load_after = os.getloadavg()

    def med(who: str, key: str) -> float:
        return statistics.median(r[key] for r in results[who])

    print(f"{args.repeats} runs each of {args.steps} steps (batch {BATCH} pairs, "
          f"{args.threads} threads); load average {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    for key, unit, scale in (
        ("step_s", "s", 1.0),
        ("peak_rss", "MiB", 2**20),
        ("rise", "MiB", 2**20),
    ):
        a, b = med("loraq", key), med("trl", key)
        print(f"  {key:8s} loraq {a / scale:8.3f} {unit}  TRL {b / scale:8.3f} {unit}  "
              f"TRL/loraq {b / a:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
