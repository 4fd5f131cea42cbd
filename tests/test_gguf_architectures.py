"""Every row of the architecture table round-trips: a tiny random model of it, written by our
merged export, reads back through transformers' GGUF loader and through ``load_gguf`` with the
original's logits; an adapter on it travels as an adapter GGUF and trains on the GGUF base."""

from __future__ import annotations

import copy

import pytest
import torch

import loraq
from gguf_tokenizers import byte_level_folder
from loraq.io.gguf_names import ARCHITECTURES, architecture_of_model_type
from loraq.io.gguf_read import load_gguf, open_gguf
from loraq.io.gguf_write import export_gguf
from loraq.io.safe import FormatError
from tiny_lm import randomize_adapters, single_thread  # noqa: F401

gguf = pytest.importorskip("gguf")

_COMMON = dict(
    vocab_size=416,  # the tokenizer's 406 ids, and rows past them
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# Gemma: llama.cpp scales queries by the head size, transformers' GGUF reader by its default 256.
_GEMMA = dict(_COMMON, num_attention_heads=2, num_key_value_heads=1, head_dim=256)
_GEMMA.update(query_pre_attn_scalar=256, sliding_window=64)
CONFIGS = {
    "llama": ("LlamaConfig", _COMMON),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=None)),
    "qwen2": ("Qwen2Config", _COMMON),
    # transformers' GGUF reader does not read qwen3.attention.key_length: Qwen3Config's default
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=128)),
    "phi3": ("Phi3Config", dict(_COMMON, pad_token_id=258, sliding_window=None)),
    "gemma2": ("Gemma2Config", _GEMMA),
    "gemma3": ("Gemma3TextConfig", _GEMMA),
}
# Which row each transformers model type is written as (llama.cpp writes Mistral as llama).
WRITTEN_AS = {"mistral": "llama"}
# The projections an adapter targets in each (Phi-3's are fused).
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def tiny(name: str, seed: int = 0):
    """A random model of ``name``'s config class, its norms randomized too (so an offset shows)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if "gemma" in name else 1.0))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A trained byte-level BPE (Llama 3 style) the files carry, so llama.cpp can load them."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        byte_level_folder(tmp_path_factory.mktemp("tok"), "llama3")
    )


@pytest.fixture
def ids():
    torch.manual_seed(7)
    return torch.randint(0, 256, (2, 10))


def test_table_covers_the_tested_architectures():
    assert set(ARCHITECTURES) == set(CONFIGS)
    with pytest.raises(FormatError, match="'gpt2' is not supported; loraq writes .*gemma3_text"):
        architecture_of_model_type("gpt2")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_export_reads_back_in_transformers_and_loraq(name, tmp_path, ids, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = tiny(name)
    path = export_gguf(hf, tmp_path / "m.gguf", merged=True, dtype="f32", tokenizer=tokenizer)
    fields = open_gguf(path).fields
    assert fields["general.architecture"].contents() == WRITTEN_AS.get(name, name)
    want = logits(hf, ids)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    torch.testing.assert_close(logits(ref, ids), want, atol=1e-4, rtol=1e-4)
    ours, tokenizer = load_gguf(path)
    assert tokenizer is not None
    torch.testing.assert_close(logits(ours, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapter_export_and_training_on_the_gguf_base(name, tmp_path, ids, tokenizer):
    base = tiny(name)
    trained = copy.deepcopy(base)
    targets = TARGETS.get(name, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    loraq.apply(trained, loraq.LoraConfig(r=4, alpha=8, targets=targets))
    randomize_adapters(trained, 0.2)
    adapter = export_gguf(trained, tmp_path / "a.gguf")
    gguf_file = export_gguf(
        base, tmp_path / "b.gguf", merged=True, dtype="f32", tokenizer=tokenizer
    )
    gguf_base, _ = load_gguf(gguf_file, tokenizer=False)
    loraq.load_gguf_adapter(gguf_base, adapter)
    torch.testing.assert_close(logits(gguf_base, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)
    # merged: the adapter folded in, read back by loraq
    merged = export_gguf(
        trained, tmp_path / "m.gguf", merged=True, dtype="f32", tokenizer=tokenizer
    )
    back, _ = load_gguf(merged, tokenizer=False)
    torch.testing.assert_close(logits(back, ids), logits(trained, ids), atol=1e-4, rtol=1e-4)
    # training on the GGUF base: the adapter's B gets a gradient
    fresh, _ = load_gguf(gguf_file, tokenizer=False)
    loraq.apply(fresh, loraq.LoraConfig(r=4, alpha=8, targets=targets))
    fresh.train()
    loss = fresh(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in fresh.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llamacpp_runs_each_architecture(name, tmp_path, ids, tokenizer):
    """llama.cpp's logits for our merged f32 file match transformers' (cosine per position),
    and with an adapter GGUF on the base the adapter's effect matches loraq's."""
    pytest.importorskip("llama_cpp")
    from llamacpp_open import open_llama

    base = tiny(name)
    trained = copy.deepcopy(base)
    loraq.apply(
        trained,
        loraq.LoraConfig(
            r=4, alpha=8, targets=TARGETS.get(name, ["q_proj", "v_proj", "down_proj"])
        ),
    )
    randomize_adapters(trained, 0.2)
    base_file = export_gguf(
        base, tmp_path / "b.gguf", merged=True, dtype="f32", tokenizer=tokenizer
    )
    adapter_file = export_gguf(trained, tmp_path / "a.gguf")
    prompt = ids[0].tolist()

    def run(lora=None):
        llm = open_llama(
            model_path=str(base_file),
            lora_path=lora,
            n_ctx=64,
            logits_all=True,
            verbose=False,
            n_threads=1,
        )
        llm.eval(prompt)
        return torch.tensor(llm.scores[: len(prompt)], dtype=torch.float32)

    cos = torch.nn.functional.cosine_similarity
    want_base, want_trained = logits(base, ids[:1])[0], logits(trained, ids[:1])[0]
    got_base, got_trained = run(), run(str(adapter_file))
    assert cos(got_base, want_base, dim=-1).min() > 0.999
    effect = cos(got_trained - got_base, want_trained - want_base, dim=-1)
    assert effect.min() > 0.99, effect


@pytest.mark.parametrize(
    ("name", "changes", "words"),
    [
        (
            "gemma2",
            {"gemma2.attention.sliding_window": (0, gguf.GGUFValueType.UINT32)},
            ["'gemma2.attention.sliding_window' is 0, outside"],
        ),
        (
            "gemma2",
            {"gemma2.final_logit_softcapping": (-1.0, gguf.GGUFValueType.FLOAT32)},
            ["'gemma2.final_logit_softcapping' must be a number > 0"],
        ),
        (
            "phi3",
            {"phi3.feed_forward_length": (40, gguf.GGUFValueType.UINT32)},
            ["'phi3.feed_forward_length' is 40", "blk.0.ffn_up.weight"],
        ),
    ],
)
def test_architecture_hyperparameters_are_checked(tmp_path, tokenizer, name, changes, words):
    from test_gguf_hostile import rewrite

    good = export_gguf(
        tiny(name), tmp_path / "g.gguf", merged=True, dtype="f32", tokenizer=tokenizer
    )
    bad = rewrite(good, tmp_path / "bad.gguf", changes)
    with pytest.raises(FormatError) as info:
        load_gguf(bad)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_export_refuses_what_the_file_cannot_say(tmp_path):
    scaled = tiny("llama")
    scaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(FormatError, match="RoPE scaling 'linear'"):
        export_gguf(scaled, tmp_path / "s.gguf", merged=True, dtype="f32")
    gemma = tiny("gemma2")
    gemma.config.query_pre_attn_scalar = 100
    with pytest.raises(FormatError, match="query_pre_attn_scalar=100.*head size 256"):
        export_gguf(gemma, tmp_path / "g.gguf", merged=True, dtype="f32")
    assert not list(tmp_path.iterdir())


def test_partial_rotary_phi_round_trips_through_load_gguf(tmp_path, ids, tokenizer):
    """Phi-4-mini style: RoPE on the first half of each head (``rope.dimension_count``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = transformers.Phi3Config(**dict(CONFIGS["phi3"][1], partial_rotary_factor=0.5))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = export_gguf(model, tmp_path / "p.gguf", merged=True, dtype="f32", tokenizer=tokenizer)
    assert open_gguf(path).fields["phi3.rope.dimension_count"].contents() == 4  # of 8
    back, _ = load_gguf(path, tokenizer=False)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-5, rtol=1e-5)
