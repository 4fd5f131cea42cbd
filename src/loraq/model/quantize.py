"""Quantize a model's frozen base (QLoRA) and turn it back into dense layers."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..core.precision import resolve_compute_dtype
from ..layers.bases import quantize_embedding, quantize_linear
from ..layers.kinds import is_gpt2_conv1d
from ..layers.lora import LoRALayer, ModulesToSave
from ..layers.protocol import LAYOUT_CONV1D, QuantizedBase
from ..layers.quantized import Embedding4bit
from ..quant.formats import GGUF, base_format
from .config import QUANT_TYPES, LoraConfig
from .targeting import candidate_modules, name_matches, output_head_names, set_submodule
from .transaction import model_transaction


def compute_dtype_of(config: LoraConfig, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype named by ``config.compute_dtype`` (``auto`` resolved for ``device``)."""
    return resolve_compute_dtype(config.compute_dtype, device)


#: ``refine(name, dense_linear, quantized_layer)``: called before a Linear is swapped out.
Refine = Callable[[str, nn.Linear, nn.Module], None]


def quantized_linear(linear: nn.Linear, config: LoraConfig) -> nn.Module:
    """``linear`` quantized in ``config.quant``'s format with ``config``'s settings."""
    return quantize_linear(
        linear,
        config.quant,
        blocksize=config.blocksize,
        double_quant=config.double_quant,
        compute_dtype=compute_dtype_of(config, linear.weight.device),
    )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: LoraConfig,
    adapted: list[str] | None = None,
    refine: Refine | None = None,
) -> list[str]:
    """Replace the frozen Linear layers of ``model`` by quantized ones, in place.

    Every ``nn.Linear`` / GPT-2 ``Conv1D`` is quantized (as ``load_in_4bit`` does), except the
    output head, ``modules_to_save``, ``config.quant_skip`` and, for the GGUF block formats, a
    layer whose input width is not a multiple of 32 (it stays dense, with a warning). With
    ``config.quant_embeddings``, ``nn.Embedding`` tables that get no adapter are stored in NF4
    (in ``config.quant`` for the GGUF formats) too. Returns the quantized names.
    ``refine`` sees each dense Linear next to its quantized layer before the swap (LoftQ uses it
    to re-quantize with the dense weight at hand), so only one dense layer is worked on at a time.
    """
    if config.quant is None:
        raise ValueError(
            f"quantize_model() needs LoraConfig.quant set to one of {', '.join(QUANT_TYPES[1:])}"
        )
    heads = output_head_names(model)
    skip = list(config.quant_skip or []) + list(config.modules_to_save or [])
    adapted = set(adapted or [])
    plan: list[tuple[str, nn.Module]] = []
    for name, module in list(candidate_modules(model)):
        if (
            not name
            or isinstance(module, (LoRALayer, ModulesToSave))
            or name in heads
            or name_matches(name, skip)
        ):
            continue
        linear = isinstance(module, nn.Linear) or is_gpt2_conv1d(module)
        table = config.quant_embeddings and type(module) is nn.Embedding and name not in adapted
        if (linear or table) and _fits_format(name, module, config):
            plan.append((name, module))
    # Check every weight before changing anything, so a bad layer leaves the model untouched.
    for name, module in plan:
        if not bool(torch.isfinite(module.weight).all()):
            raise ValueError(
                f"cannot quantize {name}.weight: it holds NaN or Inf values (LoraConfig.quant="
                f"{config.quant!r}); fix the weights or list {name!r} in LoraConfig.quant_skip"
            )
    with model_transaction(model):
        return _quantize_planned(model, config, plan, refine)


def _fits_format(name: str, module: nn.Module, config: LoraConfig) -> bool:
    """False (with a warning) for a layer the GGUF block formats cannot hold: its rows are cut
    into blocks, so the input width (embedding width) must be a multiple of the block size."""
    fmt = base_format(config.quant)
    if fmt.kind != GGUF:
        return True
    width = module.weight.shape[0 if is_gpt2_conv1d(module) else 1]
    if width % fmt.blocksize == 0:
        return True
    warnings.warn(
        f"{name} stays dense: LoraConfig.quant={config.quant!r} needs its input width to be a "
        f"multiple of {fmt.blocksize}, it is {width}",
        stacklevel=3,
    )
    return False


def _quantize_planned(
    model: nn.Module, config: LoraConfig, plan: list[tuple[str, nn.Module]], refine: Refine | None
) -> list[str]:
    done: list[str] = []
    for name, module in plan:
        if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
            new = quantized_linear(module, config)
            if refine is not None:
                refine(name, module, new)
        else:
            new = quantize_embedding(
                module, config.quant, blocksize=config.blocksize, double_quant=config.double_quant
            )
        set_submodule(model, name, new)
        done.append(name)
    return done


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer by a dense ``nn.Linear`` / ``nn.Embedding``, in place.

    ``dtype`` defaults to each layer's original dtype. Adapter wrappers are kept (their base
    becomes dense); use ``loraq.unload`` to remove them.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedBase):
            weight = module.dequantize_weight(dtype or module.qweight.dtype)
            if module.dense_layout == LAYOUT_CONV1D:
                new = _dense_conv1d(weight, module.bias)
                new.requires_grad_(False)
                _replace(model, name, new)
                continue
            new = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            new.weight.copy_(weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        elif isinstance(module, Embedding4bit):
            weight = module.dequantize_weight(dtype or module.qweight.dtype)
            new = nn.Embedding(
                module.num_embeddings,
                module.embedding_dim,
                padding_idx=module.padding_idx,
                device=weight.device,
                dtype=weight.dtype,
            )
            new.weight.copy_(weight)
        else:
            continue
        new.requires_grad_(False)
        _replace(model, name, new)
    return model


def _dense_conv1d(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    out_features, in_features = weight.shape
    layer = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight.t())
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, LoRALayer) and leaf == "base_layer":
        parent.replace_base(new)  # a Conv1D base merges in its own orientation
    else:
        set_submodule(model, name, new)
