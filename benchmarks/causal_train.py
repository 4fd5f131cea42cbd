"""`loraq train` on a causal LM vs PEFT + transformers: training tokens per second.

    taskset -c 0,1 python benchmarks/causal_train.py [--steps 8] [--repeats 2] [--threads 2]

Workload: a random-weight Llama built in code (hidden 256, FFN 688, 4 layers, 8 query / 4
key-value heads, the tests' 259-symbol byte tokenizer), sequences of 256 tokens (packed), batch
4, LoRA r=16 / alpha 32 / dropout 0.05 on every linear layer, float32, AdamW, gradient norm
clipped to 1.0, cosine schedule, gradient checkpointing on for both.

* loraq: the command line, ``python -m loraq train CONFIG`` (in a subprocess); tokens/s per step
  from its ``metrics.jsonl``.
* PEFT: ``get_peft_model`` over ``AutoModelForCausalLM`` with
  ``gradient_checkpointing_enable(use_reentrant=False)``, a plain PyTorch loop over the same
  token blocks (in a subprocess of this script), timed per step the same way (batch fetch to
  ``zero_grad``).

Runs alternate (loraq, PEFT, loraq, PEFT, ...) so that background load hits both alike; the
first ``--warmup`` steps of every run are dropped and the median of the rest is reported.
Target: loraq >= 1.3x PEFT's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
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
from tiny_lm import byte_tokenizer  # noqa: E402  (the tests' byte-level tokenizer)

SEQ, BATCH, R, ALPHA, DROPOUT, LR = 256, 4, 16, 32, 0.05, 2e-4
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


def write_text(path: Path, n_chars: int) -> Path:
    """Deterministic lines of words, about ``n_chars`` bytes (one byte = one token)."""
    import random

    rng = random.Random(0)
    lines, total = [], 0
    while total < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "."
        lines.append(line)
        total += len(line) + 1
    path.write_text("\n".join(lines) + "\n")
    return path


def loraq_run(folder: Path, data: Path, out: Path, args: argparse.Namespace) -> list[float]:
    """One ``loraq train`` run; tokens/s of each step from its metrics."""
    cfg = {
        "model": {"path": str(folder), "task": "causal-lm"},
        "data": {"train": str(data), "max_length": SEQ, "packing": True},
        "lora": {
            "r": R, "alpha": ALPHA, "dropout": DROPOUT, "targets": "all-linear",
            "compute_dtype": "float32",
        },
        "training": {
            "max_steps": args.steps, "batch_size": BATCH, "lr": LR, "schedule": "cosine",
            "gradient_checkpointing": True, "output_dir": str(out), "eval_before": False,
            "num_threads": args.threads, "progress": False, "overwrite": True,
        },
    }  # fmt: skip
    config = out.with_suffix(".json")
    config.write_text(json.dumps(cfg))
    subprocess.run(
        [sys.executable, "-m", "loraq", "train", str(config)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["tokens_per_s"] for x in lines if "tokens_per_s" in x]


def token_blocks(folder: Path, data: Path, n: int) -> torch.Tensor:
    """``n`` blocks of SEQ tokens: the text's lines tokenized and concatenated."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids: list[int] = []
    for line in data.read_text().splitlines():
        ids += tok(line)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


def peft_worker(folder: Path, data: Path, args: argparse.Namespace) -> None:
    """A PEFT + transformers training loop; prints the tokens/s of each step as JSON."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    blocks = token_blocks(folder, data, args.steps * BATCH)
    speeds = []
    for step in range(args.steps):
        tick = time.time()
        ids = blocks[step * BATCH : (step + 1) * BATCH]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(int(batch["attention_mask"].sum()) / (time.time() - tick))
    print(json.dumps(speeds))


def peft_run(folder: Path, data: Path, args: argparse.Namespace) -> list[float]:
    cmd = [
        sys.executable, __file__, "--worker", "--folder", str(folder), "--data", str(data),
        "--steps", str(args.steps), "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        peft_worker(args.folder, args.data, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = build_folder(root / "model")
        # packing: enough text for every step's batch, with a margin
        data = write_text(root / "train.txt", 2 * args.steps * BATCH * SEQ)
        speeds: dict[str, list[float]] = {"loraq train": [], "PEFT + transformers": []}
        for i in range(args.repeats):
            ours = loraq_run(folder, data, root / f"run{i}", args)[args.warmup :]
            theirs = peft_run(folder, data, args)[args.warmup :]
            print(
                f"  run {i}: loraq {statistics.median(ours):.0f} tokens/s, "
                f"PEFT {statistics.median(theirs):.0f} tokens/s (load {os.getloadavg()[0]:.1f})"
            )
            speeds["loraq train"] += ours
            speeds["PEFT + transformers"] += theirs
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.repeats} alternating runs of "
        f"{args.steps} steps ({args.warmup} warm-up dropped); Llama h256 x4 layers, batch "
        f"{BATCH}x{SEQ}, LoRA r={R} all-linear, gradient checkpointing; load {os.getloadavg()}"
    )
    med = {name: statistics.median(v) for name, v in speeds.items()}
    for name, value in med.items():
        print(f"  {name:<20} median {value:8.0f} tokens/s  ({len(speeds[name])} steps)")
    print(f"  loraq / PEFT tokens/s: {med['loraq train'] / med['PEFT + transformers']:.2f}x")


if __name__ == "__main__":
    main()
