"""The lean model (:mod:`loraq.generation.lean_model`) on a GGUF file gives transformers' model's
logits and greedy tokens on the same file, with adapters (mixed rows included) and through the
serving decode loop; its adapters save as PEFT files the transformers model loads; serving a
GGUF base with it imports none of transformers' modeling code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import loraq
from gguf_tokenizers import byte_level_folder
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState
from loraq.generation.lean_model import (
    CONFIG_FIELDS,
    LEAN_MODEL_ENV,
    LeanLlamaForCausalLM,
    LeanModelUnsupported,
    build_lean_model,
    lean_config,
)
from loraq.io.gguf_read import load_gguf
from loraq.io.gguf_write import export_gguf
from test_gguf_architectures import CONFIGS, tiny
from tiny_lm import randomize_adapters, single_thread  # noqa: F401

gguf = pytest.importorskip("gguf")
LEAN = ("llama", "mistral", "qwen2", "qwen3")  # mistral: llama.cpp writes it as llama
OTHERS = sorted(set(CONFIGS) - set(LEAN))


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    """A trained byte-level BPE (Llama 3 style) for the files to carry."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        byte_level_folder(tmp_path_factory.mktemp("tok"), "llama3")
    )


def _file(name: str, folder, vocabulary, dtype: str = "q8_0"):
    return export_gguf(
        tiny(name), folder / f"{name}.gguf", merged=True, dtype=dtype, tokenizer=vocabulary
    )


def _padded_batch():
    """Two rows of 10 tokens, the second left-padded by 3, with their positions."""
    torch.manual_seed(7)
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _logits(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


def _greedy(model, prompts, adapters, tokens: int = 8) -> list[list[int]]:
    batch = DecodeBatch(model)
    seqs = [
        SequenceState(p, a, SamplingParams(max_new_tokens=tokens))
        for p, a in zip(prompts, adapters)
    ]
    batch.add(seqs)
    while not all(s.finished for s in seqs):
        batch.step()
    return [s.generated for s in seqs]


@pytest.mark.parametrize("name", LEAN)
def test_lean_model_equals_transformers_on_the_same_file(name, tmp_path, vocabulary):
    path = _file(name, tmp_path, vocabulary)
    lean, _ = load_gguf(path, tokenizer=False, build=build_lean_model)
    ref, _ = load_gguf(path, tokenizer=False)
    assert type(lean) is LeanLlamaForCausalLM and type(ref) is not LeanLlamaForCausalLM
    assert [n for n, _ in lean.named_modules()] == [
        n for n, _ in ref.named_modules() if n in dict(lean.named_modules())
    ]
    ids, mask, positions = _padded_batch()
    real = mask.bool()
    # the same operations in the same order: float32 rounding of the same sums
    torch.testing.assert_close(
        _logits(lean, ids, mask, positions)[real], _logits(ref, ids, mask, positions)[real]
    )
    config = loraq.LoraConfig(r=4, alpha=8, targets="all-linear")
    loraq.apply(lean, config, adapter_name="a")
    torch.manual_seed(1)
    randomize_adapters(lean)
    loraq.save_adapter(lean, tmp_path / "adapter", adapter_name="a")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM"
    assert saved["base_model_name_or_path"] == str(path.resolve())
    loraq.load_adapter(ref, tmp_path / "adapter", adapter_name="a")
    torch.testing.assert_close(
        _logits(lean, ids, mask, positions)[real], _logits(ref, ids, mask, positions)[real]
    )
    prompts = [ids[0].tolist(), ids[1, 3:].tolist()]
    for adapters in (["a", None], ["a", "a"]):  # mixed rows, then one adapter for all
        assert _greedy(lean, prompts, adapters) == _greedy(ref, prompts, adapters), adapters


@pytest.mark.parametrize("name", OTHERS)
def test_other_architectures_keep_transformers_model(name, tmp_path, vocabulary, monkeypatch):
    path = _file(name, tmp_path, vocabulary, dtype="f32")
    model, _ = load_gguf(path, tokenizer=False, build=build_lean_model)
    assert type(model) is not LeanLlamaForCausalLM
    monkeypatch.setenv(LEAN_MODEL_ENV, "on")
    with pytest.raises(LeanModelUnsupported, match=f"{LEAN_MODEL_ENV}=on but .*Config"):
        load_gguf(path, tokenizer=False, build=build_lean_model)


def test_switch_off_builds_transformers_model(tmp_path, vocabulary, monkeypatch):
    path = _file("llama", tmp_path, vocabulary)
    monkeypatch.setenv(LEAN_MODEL_ENV, "off")
    model, _ = load_gguf(path, tokenizer=False, build=build_lean_model)
    assert type(model).__name__ == "LlamaForCausalLM"
    monkeypatch.setenv(LEAN_MODEL_ENV, "sometimes")
    with pytest.raises(ValueError, match=LEAN_MODEL_ENV):
        load_gguf(path, tokenizer=False, build=build_lean_model)


def test_lean_config_names_what_it_lacks():
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1)
    base["num_attention_heads"] = 2
    assert lean_config("LlamaConfig", base).head_dim == 4
    reason = lean_config("LlamaConfig", dict(base, rope_scaling={"rope_type": "yarn"}))
    assert reason == "config arguments ['rope_scaling'] are not the lean model's"
    assert "Phi3Config is not one of" in lean_config("Phi3Config", base)
    assert "sliding_window" not in CONFIG_FIELDS and "partial_rotary_factor" not in CONFIG_FIELDS


def test_serving_a_gguf_base_imports_no_transformers_modeling(tmp_path, vocabulary):
    """The point of the lean model: no torch compiler, no transformers modeling import."""
    path = _file("llama", tmp_path, vocabulary)
    script = f"""
import sys
from loraq.serve.loading import load_base
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState
model, tok = load_base({str(path)!r})
batch = DecodeBatch(model)
seq = SequenceState(tok("hello")["input_ids"], None, SamplingParams(max_new_tokens=3))
batch.add([seq])
while not seq.finished:
    batch.step()
heavy = [m for m in ("torch._dynamo", "transformers.modeling_utils") if m in sys.modules]
print(type(model).__name__, len(seq.generated), heavy)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "LeanLlamaForCausalLM 3 []", done.stdout


def test_the_mask_is_causal_masks_padding_and_leaves_no_row_empty():
    from loraq.generation.lean_model import attention_mask_4d

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for past, length in ((2, 3), (0, 5)):  # a decode after a prefill, and the prefill
        mask = attention_mask_4d(padding, 2, past, length, torch.device("cpu"))
        assert mask.shape == (2, 1, length, 5)
        for row in range(2):
            for query in range(length):
                seen = mask[row, 0, query].nonzero().flatten().tolist()
                position = past + query
                # a padding query sees only itself: its output is unused, and no key is NaN
                want = [k for k in range(position + 1) if padding[row, k]] or [position]
                assert seen == want, (past, row, query, seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rotate_are_transformers_arithmetic(dtype):
    """The pure functions the lean model and the lean decode step share, against transformers'
    own formulas: the same floats."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from loraq.generation.lean_model import rms_norm, rotate, signed_sin

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 64).to(dtype)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
        assert torch.equal(rms_norm(x, norm.weight, 1e-5), norm(x))
    cos, sin = torch.randn(2, 4, 64).to(dtype), torch.randn(2, 4, 64).to(dtype)  # (rows, pos, dim)
    q, k = apply_rotary_pos_emb(x, x * 2, cos, sin, unsqueeze_dim=1)
    cos, signed = cos.unsqueeze(1), signed_sin(sin.unsqueeze(1))
    assert torch.equal(rotate(x, cos, signed), q) and torch.equal(rotate(x * 2, cos, signed), k)


def test_is_rms_norm_knows_the_llama_family_norms_and_nothing_else():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from loraq.generation.lean_model import RMSNorm, is_rms_norm

    assert is_rms_norm(RMSNorm(8, 1e-6))
    assert is_rms_norm(LlamaRMSNorm(8)) and is_rms_norm(Qwen3RMSNorm(8))

    class Subclass(RMSNorm):  # may compute anything: called as a module
        pass

    assert not is_rms_norm(Subclass(8, 1e-6))
    assert not is_rms_norm(torch.nn.LayerNorm(8)) and not is_rms_norm(None)
