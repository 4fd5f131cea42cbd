"""The README and the package agree: every ``loraq.<name>`` the README mentions exists, and the
calls it names are functions, not modules."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import loraq

README = Path(__file__).resolve().parents[1] / "README.md"


def _resolve(dotted: str):
    """The object ``loraq.a.b`` names: an attribute chain, importing submodules on the way."""
    obj, path = loraq, "loraq"
    for part in dotted.split(".")[1:]:
        path = f"{path}.{part}"
        if not hasattr(obj, part):
            importlib.import_module(path)
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(
    "dotted", sorted(set(re.findall(r"loraq(?:\.[A-Za-z_]\w*)+", README.read_text("utf-8"))))
)
def test_every_name_the_readme_mentions_exists(dotted: str) -> None:
    # a trailing ".py" or sentence dot is not part of a name
    dotted = dotted.removesuffix(".py")
    assert _resolve(dotted) is not None


def test_quantize_model_is_the_function() -> None:
    from loraq.model.quantize import quantize_model

    assert loraq.quantize_model is quantize_model
    assert "quantize_model" in loraq.__all__
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    names = loraq.quantize_model(model, loraq.LoraConfig(r=4, quant="nf4"))
    assert names  # at least the first Linear (the last one is the output head)
    assert not isinstance(model[0], torch.nn.Linear)
    assert model(torch.randn(2, 64)).shape == (2, 8)
