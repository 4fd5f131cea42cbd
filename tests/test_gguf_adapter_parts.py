"""Adapter GGUFs never drop a trained part: LoRA on the head and the embedding travel in the
form llama.cpp applies; modules_to_save, trained biases and a LoRA on a tied head are refused
with one line that names the module and points to --merged, which carries them."""

from __future__ import annotations

import copy

import pytest
import torch

import loraq
from loraq.io.gguf_read import load_gguf, open_gguf, tensor_value
from loraq.io.gguf_write import export_gguf
from loraq.io.safe import FormatError
from tiny_lm import randomize_adapters, single_thread  # noqa: F401

pytest.importorskip("gguf")
from conftest import tiny_llama  # noqa: E402


@pytest.fixture
def ids():
    torch.manual_seed(3)
    return torch.randint(0, 64, (2, 9))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapted(base, config: loraq.LoraConfig):
    model = copy.deepcopy(base)
    loraq.apply(model, config)
    randomize_adapters(model, 0.3)
    with torch.no_grad():  # trained copies that differ from the originals
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_head_and_embedding_lora_travel_as_llama_cpp_applies_them(tmp_path, ids):
    base = tiny_llama()
    assert not base.config.tie_word_embeddings
    targets = ["q_proj", "v_proj", "lm_head", "embed_tokens"]
    trained = adapted(base, loraq.LoraConfig(r=4, alpha=8, targets=targets))
    path = export_gguf(trained, tmp_path / "a.gguf")
    reader = open_gguf(path)
    tensors = {t.name: tensor_value(t, "a")[1] for t in reader.tensors}
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert "output.weight.lora_a" in tensors
    # llama.cpp's embedding rule: delta(token) = alpha / r * lora_b @ lora_a[token]
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a.shape == (64, 4) and b.shape == (32, 4)
    embedding = trained.model.embed_tokens
    token_ids = torch.arange(64)
    with torch.no_grad():
        want = embedding(token_ids) - embedding.base_layer(token_ids)
    got = (alpha / a.shape[1]) * (a[token_ids] @ b.t())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and loraq reads the file back onto the base with the trained logits
    base_copy = copy.deepcopy(base)
    loraq.load_gguf_adapter(base_copy, path)
    torch.testing.assert_close(logits(base_copy, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)


def test_merged_export_carries_head_embedding_and_modules_to_save(tmp_path, ids):
    base = tiny_llama()
    config = loraq.LoraConfig(
        r=4, alpha=8, targets=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]
    )
    trained = adapted(base, config)
    path = export_gguf(trained, tmp_path / "m.gguf", merged=True, dtype="f32")
    back, _ = load_gguf(path)
    torch.testing.assert_close(logits(back, ids), logits(trained, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("config", "module"),
    [
        (dict(targets=["q_proj"], modules_to_save=["lm_head"]), "lm_head is a modules_to_save"),
        (dict(targets=["q_proj"], modules_to_save=["embed_tokens"]), "embed_tokens is a modules"),
        (dict(targets=["q_proj"], bias="lora_only"), "trains biases"),
    ],
)
def test_parts_an_adapter_gguf_cannot_hold_are_refused(tmp_path, config, module):
    trained = adapted(tiny_llama(), loraq.LoraConfig(r=4, alpha=8, **config))
    out = tmp_path / "a.gguf"
    with pytest.raises(FormatError, match=f"{module}.*--merged carries it") as err:
        export_gguf(trained, out)
    assert "\n" not in str(err.value) and not out.exists()


def test_lora_on_a_tied_head_is_refused(tmp_path):
    base = tiny_llama()
    base.config.tie_word_embeddings = True
    trained = adapted(base, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "lm_head"]))
    with pytest.raises(FormatError, match="lm_head .*tied.*--merged carries it"):
        export_gguf(trained, tmp_path / "a.gguf")


PARAMETER_TARGETS = ["self_attn.q_proj.weight", "mlp.down_proj.weight"]


def parameter_adapted(base):
    """A LoRA on 2-D weights given as parameters (``ParamLoRA``) besides one on v_proj."""
    config = loraq.LoraConfig(r=4, alpha=8, targets=["v_proj"], target_parameters=PARAMETER_TARGETS)
    return adapted(base, config)


def test_adapter_gguf_refuses_lora_on_parameters(tmp_path):
    trained = parameter_adapted(tiny_llama())
    out = tmp_path / "a.gguf"
    with pytest.raises(
        FormatError, match=r"q_proj\.weight .*parameter.*--merged carries it"
    ) as err:
        export_gguf(trained, out)
    assert "\n" not in str(err.value) and not out.exists()


@pytest.mark.parametrize("merge_first", [False, True])
def test_merged_export_carries_lora_on_parameters(tmp_path, ids, merge_first):
    base = tiny_llama()
    trained = parameter_adapted(base)
    assert (logits(trained, ids) - logits(base, ids)).abs().max() > 1e-2  # the adapter acts
    want = logits(trained, ids)
    if merge_first:
        loraq.merge(trained)
    path = export_gguf(trained, tmp_path / "m.gguf", merged=True, dtype="f32")
    back, _ = load_gguf(path)
    torch.testing.assert_close(logits(back, ids), want, atol=1e-5, rtol=1e-5)
