"""Check an adapter file against its config and the model before anything is allocated.

``load_adapter`` builds the adapter from ``adapter_config.json`` (rank, targets) and then copies
the file's tensors in. A file from someone else may disagree with its own config (``r: 1e9``
next to rank-4 tensors) or hold NaN/Inf values; both are caught here, naming the tensor, before
a single adapter weight exists. The expected shapes per layer kind:

=====================  =========================================  ============================
layer                  ``lora_A`` / ``lora_embedding_A``           ``lora_B`` / ``..._B``
=====================  =========================================  ============================
Linear (dense, 4/8-bit) ``(r, in)``                                ``(out, r)``
GPT-2 Conv1D           ``(r, in)``  (weight is stored (in, out))  ``(out, r)``
Conv1d/2d/3d           ``(r, in_channels, *kernel)``               ``(out_channels, r, 1, ...)``
Embedding              ``(r, num_embeddings)``                     ``(embedding_dim, r)``
=====================  =========================================  ============================

DoRA adds ``lora_magnitude_vector`` of shape ``(out,)`` (``embedding_dim`` is never DoRA).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.kinds import layer_kind
from ..layers.lora import LoRALayer
from ..model.config import LoraConfig
from ..native import slots as slot_kernels
from .safe import FormatError


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`FormatError` naming the first floating tensor that holds NaN or Inf."""
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    if slot_kernels.first_nonfinite(list(floats.values())) == -1:
        return  # all float32 on CPU, checked in one compiled call
    for key, tensor in floats.items():
        if not bool(torch.isfinite(tensor).all()):
            raise FormatError(f"{source}: tensor {key!r} holds NaN or Inf values")


def expected_shapes(module: nn.Module, r: int, dora: bool) -> dict[str, tuple[int, ...]]:
    """On-disk key suffixes (after the module's name) and the shapes the file must hold."""
    if isinstance(module, LoRALayer):
        module = module.base_layer
    kind = layer_kind(module)
    shapes = dict(zip(kind.factor_suffixes, kind.factor_shapes(module, r), strict=True))
    if dora and kind.supports_dora:
        shapes["lora_magnitude_vector"] = (kind.in_out(module)[1],)
    return shapes


def check_adapter_shapes(
    model: nn.Module,
    config: LoraConfig,
    targets: list[str],
    tensors: dict[str, torch.Tensor],
    prefix: str,
    source: str,
) -> None:
    """The adapter tensors in ``tensors`` have the config's rank and the layer's size, and at
    least one targeted module has its tensors; raises :class:`FormatError` naming the key.

    Keys that are merely missing or unexpected (with others present) are left to the strict
    check after loading, which lists both kinds at once.
    """
    missing, found_any = [], False
    for name in targets:
        for suffix, shape in expected_shapes(
            model.get_submodule(name), config.r, config.use_dora
        ).items():
            key = f"{prefix}{name}.{suffix}"
            if key not in tensors and suffix == "lora_magnitude_vector":
                key += ".weight"  # older PEFT releases
            if key not in tensors:
                missing.append(f"{prefix}{name}.{suffix}")
                continue
            found_any = True
            found = tuple(tensors[key].shape)
            if found != shape:
                raise FormatError(
                    f"{source}: tensor {key!r} has shape {found} but the model expects {shape} "
                    f"(r={config.r} from the adapter config, layer {name!r})"
                )
    if missing and not found_any:
        raise FormatError(
            f"{source} does not fit the model: missing keys {missing[:10]}"
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )
