"""1,000 adapters behind ``loraq serve``, 64 resident: random-adapter traffic vs one adapter.

    python benchmarks/serve_adapters.py [--adapters 1000] [--resident 64] [--requests 256]
        [--concurrency 32] [--tokens 16] [--runs 3] [--threads 2] [--distinct-prompts]
        [--prefix-cache-mb MB] [--shape stories|smollm2] [--warm]

Starts ``loraq serve`` on 127.0.0.1 with a tiny base (stories260K from ``--stories``, default
../shared/models/stories260K beside the repository; else a random Llama of its shape), saved
with a byte-level tokenizer to a temporary folder, and ``--adapters`` generated adapter folders
under ``--adapter-dir`` (all linear layers, ranks drawn from 4, 8, 16, 32, 64; random weights, written directly as safetensors). Then, per run
and alternating, ``--requests`` completions with at most ``--concurrency`` in flight: all on one
adapter, then each on an adapter drawn at random. Prints generated tokens/s of each load, their
ratio (target >= 0.85x), the LRU's loads and evictions from ``/metrics``, the load average and the
number of runs. ``--warm``: one 1-token request per adapter before the timed runs, so the
server's host copies (parsed and staged, up to its host cache's size) hold the adapters and the
timed loads are from memory, not first reads from disk. Timings are wall time on whatever else the machine is running: read the ratio.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import loraq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import machine_line  # noqa: E402

from stories260k import STORIES, load_stories260k  # noqa: E402  (the tests' converter)
from tiny_lm import byte_tokenizer  # noqa: E402

RANKS = (4, 8, 16, 32, 64)
PROMPTS = ["Once upon a time", "The little dog", "She said", "One day, Tom", "In the park"]


#: ``--shape smollm2``: a random Llama of SmolLM2-135M's width (its first 4 of 30 layers).
SMOLLM2_WIDTH = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
)  # fmt: skip


def base_folder(
    root: Path, stories: Path, exact_vocabulary: bool = False, shape: str = "stories"
) -> tuple[Path, str]:
    """A transformers folder (model + byte tokenizer) for the tiny base, and its description.

    ``exact_vocabulary`` cuts the embeddings to the tokenizer's ids, as lm-eval's ``peft=`` path
    does on loading (else its log-softmax would run over fewer logits than the server's).
    ``shape="smollm2"``: a random Llama of :data:`SMOLLM2_WIDTH` instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape == "smollm2":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_WIDTH)).eval()
        what = "random Llama, SmolLM2-135M width, 4 layers"
    elif (stories / "stories260K.bin").is_file():
        model, what = load_stories260k(stories), "stories260K"
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        )  # fmt: skip
        model, what = LlamaForCausalLM(cfg).eval(), "random Llama, stories260K shape"
    tokenizer = byte_tokenizer()  # 259 byte-level ids, all inside the vocabulary
    if exact_vocabulary:
        model.resize_token_embeddings(len(tokenizer))
    folder = root / "base"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, what


def write_adapters(base: Path, root: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` adapter folders a0000.. under ``root``: one template saved per rank by loraq,
    then each adapter its template's config with fresh random weights (fast for 1,000)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    templates = {}
    for r in RANKS:
        model = AutoModelForCausalLM.from_pretrained(base)
        config = loraq.LoraConfig(r=r, alpha=2 * r, targets="all-linear")
        loraq.apply(model, config, "t", allow_large_rank=True)  # r=64 > stories260K's k_proj
        loraq.save_adapter(model, root / f"_t{r}", adapter_name="t")
        folder = root / f"_t{r}"
        templates[r] = (
            (folder / "adapter_config.json").read_text(),
            load_file(folder / "adapter_model.safetensors"),
        )
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        name, r = f"a{i:04d}", rng.choice(RANKS)
        config, tensors = templates[r]
        folder = root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(config)
        weights = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in tensors.items()}
        save_file(weights, folder / "adapter_model.safetensors")
        names.append(name)
    return names


class Server:
    """``loraq serve`` in a subprocess (killed on exit)."""

    def __init__(self, args: list[str], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAQ_API_KEY": ""}
        cmd = [sys.executable, "-m", "loraq.cli", "serve", "--port", str(self.port), *args]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600) -> float:
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"loraq serve exited early; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("loraq serve did not start in time")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def run_load(
    url: str, models: list[str], tokens: int, concurrency: int, distinct: bool = False
) -> tuple[float, int]:
    """(wall seconds, generated tokens) for one completion per entry of ``models``; with
    ``distinct`` every prompt ends with its own number (no prefix-cache hits on either side)."""
    import httpx

    local = threading.local()
    clients: list[httpx.Client] = []

    def one(i: int, model: str) -> int:
        # a client per worker thread: one shared by all 32 failed twice with ReadError EBADF
        # on a read; its own clients keep the client's shared pool out of the question
        if not hasattr(local, "client"):
            local.client = httpx.Client()
            clients.append(local.client)
        prompt = PROMPTS[i % len(PROMPTS)] + (f" {i}." if distinct else "")
        body = {
            "model": model, "prompt": prompt, "max_tokens": tokens,
            "temperature": 1.0, "seed": i,
        }  # fmt: skip
        reply = local.client.post(url + "/v1/completions", json=body, timeout=600)
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    try:
        with cf.ThreadPoolExecutor(concurrency) as pool:
            start = time.perf_counter()
            done = sum(pool.map(one, range(len(models)), models))
            return time.perf_counter() - start, done
    finally:
        for client in clients:
            client.close()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--resident", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stories", type=Path, default=STORIES, help="stories260K folder")
    p.add_argument(
        "--shape",
        choices=("stories", "smollm2"),
        default="stories",
        help="the base: stories260K (or a random Llama of its shape), or a random Llama of "
        "SmolLM2-135M's width with 4 layers",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=None,
        help="the server's --prefix-cache-mb (0: off; default: the server's own). The one-adapter "
        "side's repeated prompts are answered from the cache, which random adapters cannot share",
    )
    p.add_argument(
        "--warm",
        action="store_true",
        help="before timing, one 1-token request per adapter (loads from the host copies, not "
        "from disk, as on a server that has run a while)",
    )
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="end every prompt with its own number: the prefix cache then helps neither side "
        "(by default the one-adapter side reuses the 5 repeating prompts' keys)",
    )
    args = p.parse_args()
    print(machine_line())
    import httpx

    with tempfile.TemporaryDirectory(prefix="serve_adapters_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        base, what = base_folder(root, args.stories, shape=args.shape)
        names = write_adapters(base, root / "adapters", args.adapters)
        print(f"base: {what}; {len(names)} adapters (ranks {RANKS}) written in "
              f"{time.perf_counter() - t:.1f} s")  # fmt: skip
        server = Server(
            [
                "--base",
                str(base),
                "--adapter-dir",
                str(root / "adapters"),
                "--max-adapters",
                str(args.resident),
                "--max-batch",
                str(args.concurrency),
                "--max-queue",
                str(max(256, args.requests)),
                "--threads",
                str(args.threads),
                *(
                    []
                    if args.prefix_cache_mb is None
                    else ["--prefix-cache-mb", str(args.prefix_cache_mb)]
                ),
            ],  # fmt: skip
            root / "server.log",
        )
        try:
            print(f"server ready in {server.wait_ready():.1f} s")
            rng = random.Random(1)
            run_load(server.url, [names[0]] * args.concurrency, args.tokens, args.concurrency)
            if args.warm:
                t = time.perf_counter()
                run_load(server.url, names, 1, args.concurrency)
                print(f"warmed: one request per adapter in {time.perf_counter() - t:.1f} s")
            one_tps, mixed_tps = [], []
            for run in range(args.runs):
                single = [names[0]] * args.requests
                spread = [rng.choice(names) for _ in range(args.requests)]
                for label, models, out in (("one", single, one_tps), ("random", spread, mixed_tps)):
                    wall, done = run_load(
                        server.url, models, args.tokens, args.concurrency, args.distinct_prompts
                    )
                    out.append(done / wall)
                    print(f"run {run + 1} {label:>6}: {done} tokens in {wall:.2f} s = "
                          f"{done / wall:.1f} tokens/s")  # fmt: skip
            text = httpx.get(server.url + "/metrics").text
            loads = metric(text, "loraq_adapter_loads_total")
            evictions = metric(text, "loraq_adapter_evictions_total")
            rss = server.peak_rss_mb()
        finally:
            server.close()
    ratios = [m / o for m, o in zip(mixed_tps, one_tps)]
    print(json.dumps({
        "requests_per_load": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.tokens, "runs": args.runs, "distinct_prompts": args.distinct_prompts,
        "prefix_cache_mb": args.prefix_cache_mb, "warm": args.warm,
        "one_adapter_tokens_per_s": round(statistics.median(one_tps), 1),
        f"random_of_{args.adapters}_tokens_per_s": round(statistics.median(mixed_tps), 1),
        "ratio_random_vs_one": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "lru_loads": loads, "lru_evictions": evictions, "server_peak_rss_mb": round(rss),
        "load_average": os.getloadavg(),
    }, indent=1))  # fmt: skip
    print("target: ratio >= 0.85")
    print(machine_line())


if __name__ == "__main__":
    main()
