"""install_adapter: load_adapter's model half, and its path that touches the wrapped layers only."""

from __future__ import annotations

import pytest
import torch

import loraq
from loraq.io.peft_format import install_adapter, read_adapter
from loraq.model.surgery import active_adapter, adapter_names
from tiny_lm import randomize_adapters, tiny_causal_lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    model = tiny_causal_lm()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "new")
    torch.manual_seed(3)
    randomize_adapters(model, 0.5)
    loraq.save_adapter(model, tmp / "new", adapter_name="new")
    return tmp / "new"


def _served_model():
    model = tiny_causal_lm().eval()
    for name, r in {"a": 2, "b": 8}.items():
        loraq.apply(model, loraq.LoraConfig(r=r, alpha=r, targets="all-linear"), name)
    randomize_adapters(model, 0.5)
    loraq.set_adapter(model, "a")
    return model


def test_install_without_activation_equals_load_adapter(saved):
    reference = loraq.load_adapter(_served_model(), saved, adapter_name="new")
    model = _served_model()
    install_adapter(model, *read_adapter(saved, "new"), adapter_name="new", activate=False)
    assert adapter_names(model) == ["a", "b", "new"]
    assert active_adapter(model) == "a"  # left as it was
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".new." in n)
    mine = loraq.adapter_state_dict(model, "new")
    theirs = loraq.adapter_state_dict(reference, "new")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), loraq.adapter_rows(model, ["new"]):
        out = model(ids).logits
    with torch.no_grad(), loraq.adapter_rows(reference, ["new"]):
        expected = reference(ids).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_failed_install_leaves_the_model_as_it_was(saved):
    model = _served_model()
    config, tensors, weights = read_adapter(saved, "new")
    tensors = dict(tensors)
    tensors.pop(sorted(tensors)[0])  # found missing after the layers got the adapter
    versions = [m.adapter_version for m in model.modules() if isinstance(m, loraq.LoRALayer)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys"):
        install_adapter(model, config, tensors, weights, adapter_name="new", activate=False)
    assert adapter_names(model) == ["a", "b"]
    layers = [m for m in model.modules() if isinstance(m, loraq.LoRALayer)]
    assert all("new" not in m.r and "new" not in m.lora_A for m in layers)
    assert [m.adapter_version for m in layers] == versions
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_adapters_added_to_a_model_in_eval_mode_stay_in_eval_mode(saved):
    """A server calls model.eval() before loading adapters on demand: their wrappers and
    dropout must not switch to training (dropout drawn at serving time)."""
    model = tiny_causal_lm().eval()
    loraq.apply(model, loraq.LoraConfig(r=4, dropout=0.5, targets="all-linear"), "a")
    config, tensors, weights = read_adapter(saved, "new")
    install_adapter(
        model, config.replace(dropout=0.5), tensors, weights, adapter_name="new", activate=False
    )
    assert not any(m.training for m in model.modules())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), loraq.adapter_rows(model, ["new"]):
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)
