"""Scoring throughput: ``loraq serve`` (echo, max_tokens 0) vs lm-eval's own ``hf`` model + PEFT.

    python benchmarks/serve_scoring.py [--adapters 8] [--concurrency 32] [--rounds 3]
        [--threads 2] [--hf-batch 32] [--repeat 1]

The task is the shipped ``examples/eval/loraq_tiny_mc`` (16 questions x 4 choices: 64
log-likelihood requests, ``--repeat`` copies of them) scored once per adapter, every adapter
rank 8 on all linear layers, random weights, fp32. The base is stories260K (``--stories``,
default ../shared/models/stories260K; else a random Llama of its shape) with a byte-level
tokenizer, its vocabulary cut to the tokenizer's 259 ids (lm-eval's ``peft=`` path resizes the
embeddings to the tokenizer; both sides then run the same model).

- served: ``loraq serve`` on 127.0.0.1 in a subprocess (``--threads``), every adapter loaded;
  each request one prompt (lm-eval's context + continuation token ids, as its ``hf`` model
  encodes them) with ``echo: true, max_tokens: 0, logprobs: 0``; ``--concurrency`` requests in
  flight, request i on adapter i mod ``--adapters`` (mixed-adapter batches).
- lm-eval hf: one ``HFLM(pretrained=BASE, peft=ADAPTER, batch_size=--hf-batch)`` per adapter
  (loaded before timing), ``loglikelihood`` of the task's requests, adapter after adapter,
  in this process with the same thread count.

Both score the same tokens; the rounds alternate (shuffled, after a warm-up) and the ratio of
median tokens/s is printed with the load average. The served log-likelihoods are checked
against lm-eval's (max difference printed). Timings are wall time on whatever else the machine
runs: read the ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import loraq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_adapters import Server, base_folder  # noqa: E402  (loraq serve in a subprocess)
from timing import interleaved  # noqa: E402

from stories260k import STORIES  # noqa: E402  (the tests' converter)
from tiny_lm import randomize_adapters  # noqa: E402

TASK = "loraq_tiny_mc"
EXAMPLES = ROOT / "examples" / "eval"


def write_adapters(base: Path, root: Path, count: int) -> list[Path]:
    """``count`` rank-8 all-linear adapters with random weights (fp32 compute), PEFT layout."""
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(count):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = loraq.LoraConfig(r=8, alpha=16, targets="all-linear", compute_dtype="float32")
        loraq.apply(model, config)
        torch.manual_seed(100 + i)
        randomize_adapters(model, 0.05)
        folders.append(loraq.save_adapter(model, root / f"a{i}"))
    return folders


def task_requests(repeat: int) -> list:
    """lm-eval's log-likelihood ``Instance``s of the task (every document), ``repeat`` times."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(EXAMPLES))
    task = get_task_dict([TASK], manager)[TASK]  # (deprecated name, same object)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [inst for _ in range(repeat) for inst in task.instances]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="copies of the task's requests")
    p.add_argument("--stories", type=Path, default=STORIES, help="stories260K folder")
    args = p.parse_args()
    import httpx
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="serve_scoring_") as tmp:
        root = Path(tmp)
        base, what = base_folder(root, args.stories, exact_vocabulary=True)
        adapters = write_adapters(base, root, args.adapters)
        requests = task_requests(args.repeat)
        hf = [
            HFLM(
                pretrained=str(base), peft=str(a), device="cpu", dtype="float32",
                batch_size=args.hf_batch,
            )
            for a in adapters
        ]  # fmt: skip
        pairs = [hf[0]._encode_pair(*inst.args) for inst in requests]
        tokens = sum(len(ctx) + len(cont) for ctx, cont in pairs) * len(adapters)
        names = [f"a{i}" for i in range(len(adapters))]
        flags = [x for n, a in zip(names, adapters) for x in ("--adapter", f"{n}={a}")]
        server = Server(
            ["--base", str(base), *flags, "--max-batch", str(args.concurrency),
             "--max-adapters", str(len(adapters)), "--threads", str(args.threads)],
            root / "server.log",
        )  # fmt: skip
        try:
            server.wait_ready()
            jobs = [(j, names[j % len(names)]) for j in range(len(pairs) * len(names))]
            served: dict[tuple[str, int], float] = {}

            def score(client: httpx.Client, job: tuple[int, str]) -> None:
                j, name = job
                ctx, cont = pairs[j // len(names)]
                body = {"model": name, "prompt": ctx + cont, "max_tokens": 0, "echo": True}
                reply = client.post(server.url + "/v1/completions", json={**body, "logprobs": 0})
                reply.raise_for_status()
                lps = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
                served[(name, j // len(names))] = sum(lps[len(ctx) :])

            def through_server() -> None:
                with (
                    httpx.Client(timeout=600) as client,
                    cf.ThreadPoolExecutor(args.concurrency) as pool,
                ):
                    list(pool.map(lambda job: score(client, job), jobs))

            theirs: dict[str, list[float]] = {}

            def lm_eval_hf() -> None:
                for name, lm in zip(names, hf):
                    out = lm.loglikelihood(requests, disable_tqdm=True)
                    theirs[name] = [ll for ll, _ in out]

            load = os.getloadavg()
            times = interleaved({"served": through_server, "lm-eval hf": lm_eval_hf}, args.rounds)
            load_after = os.getloadavg()
        finally:
            server.close()
    diff = max(abs(served[(n, i)] - theirs[n][i]) for n in names for i in range(len(pairs)))
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"base: {what}; {len(adapters)} adapters (r=8, all linear, fp32); task {TASK}: "
          f"{len(pairs)} requests x {len(adapters)} adapters = {tokens:,} tokens a round; "
          f"{args.threads} threads each side; {args.rounds} rounds")  # fmt: skip
    for name, value in rate.items():
        spread = ", ".join(f"{tokens / t:,.0f}" for t in times[name])
        print(f"  {name:<11} {value:>9,.0f} tokens/s (median; rounds: {spread})")
    detail = f"{args.concurrency} concurrent requests vs hf batch_size {args.hf_batch}"
    print(f"  ratio served / lm-eval hf: {rate['served'] / rate['lm-eval hf']:.2f}x  ({detail})")
    print(f"  max |served - hf| log-likelihood per request: {diff:.2e}")
    print(f"  load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
