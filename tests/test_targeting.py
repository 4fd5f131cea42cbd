"""loraq.model.targeting: the model-tree rules shared by apply, quantize, decompose and the file formats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraq
from loraq.core.naming import disk_key, memory_key
from loraq.model.targeting import name_matches, output_head_names, set_submodule, unwrapped_name


class _HeadNet(nn.Module):
    """A model whose output head has none of the conventional names."""

    def __init__(self, failure: type[Exception] | None = None, report_head: bool = True) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.proj_out = nn.Linear(8, 4)
        self.failure = failure
        self.report_head = report_head

    def get_output_embeddings(self) -> nn.Module | None:
        if self.failure is not None:
            raise self.failure("get_output_embeddings broke")
        return self.proj_out if self.report_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.body(x))


def test_all_linear_leaves_the_reported_output_head_alone() -> None:
    model = loraq.apply(_HeadNet(), loraq.LoraConfig(r=2, targets="all-linear"))
    assert isinstance(model.body, loraq.LoRALayer)
    assert isinstance(model.proj_out, nn.Linear)
    assert output_head_names(model) == {"proj_out"}


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_a_failing_get_output_embeddings_is_reported_not_swallowed(quant: str | None) -> None:
    # Swallowing the error would adapt (and quantize) proj_out as if it were a hidden layer.
    model = _HeadNet(failure=AttributeError)
    with pytest.raises(
        RuntimeError, match=r"_HeadNet.get_output_embeddings\(\) raised AttributeError"
    ):
        loraq.apply(model, loraq.LoraConfig(r=2, targets="all-linear", quant=quant))
    assert type(model.proj_out) is nn.Linear and type(model.body) is nn.Linear


def test_not_implemented_output_embeddings_means_no_head() -> None:
    # transformers' answer for models without an output layer
    model = loraq.apply(_HeadNet(failure=NotImplementedError), loraq.LoraConfig(r=2))
    assert isinstance(model.proj_out, loraq.LoRALayer)


def test_unwrapped_name_strips_whole_segments_only() -> None:
    assert unwrapped_name("encoder.layer.0.base_layer") == "encoder.layer.0"
    assert unwrapped_name("head.original_module") == "head"
    assert unwrapped_name("encoder.base_layers.0") == "encoder.base_layers.0"
    assert unwrapped_name("encoder.base_layers.0.base_layer") == "encoder.base_layers.0"


def test_name_matches_follows_peft() -> None:
    assert name_matches("model.layers.0.q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.xq_proj", ["q_proj"])
    assert name_matches("model.layers.0.q_proj", r".*\.0\.q_proj")
    assert not name_matches("model.layers.10.q_proj", r".*\.1\.q_proj")


def test_set_submodule_replaces_nested_and_refuses_the_root() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    set_submodule(model, "0.0", nn.Identity())
    assert isinstance(model[0][0], nn.Identity)
    with pytest.raises(ValueError, match="non-empty module name"):
        set_submodule(model, "", nn.Identity())


def test_disk_and_memory_keys_are_inverse() -> None:
    for name in ("m.lora_A.a1.weight", "m.lora_embedding_B.a1", "m.lora_magnitude_vector.a1"):
        assert memory_key(disk_key(name, "a1"), "a1") == name
    assert disk_key("head.modules_to_save.a1.weight", "a1") == "head.weight"
    assert memory_key("m.lora_magnitude_vector.weight", "x") == "m.lora_magnitude_vector.x"
    assert memory_key("m.base_layer.bias", "x") is None
