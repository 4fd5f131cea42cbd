"""``summary``: how many parameters train, how many bytes each part of the model takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.naming import ADAPTER_STORES
from ..layers.lora import LoRALayer, ModulesToSave
from ..layers.param_lora import ParamLoRA
from ..layers.protocol import quantized_weight_of


@dataclass
class Summary:
    """Parameter counts and weight bytes of a (possibly adapted, possibly quantized) model.

    ``total_params`` counts logical parameters: a quantized weight counts its full shape, so the
    numbers compare directly with the dense model. ``bytes`` maps each part (``adapters``,
    ``modules_to_save``, ``base_dense``, ``base_quantized``) to the bytes its tensors occupy.
    """

    trainable_params: int
    total_params: int
    bytes: dict[str, int] = field(default_factory=dict)
    quantized_params: int = 0

    @property
    def trainable_fraction(self) -> float:
        """``trainable_params / total_params``."""
        return self.trainable_params / max(self.total_params, 1)

    @property
    def total_bytes(self) -> int:
        """Bytes of all weights and buffers counted."""
        return sum(self.bytes.values())

    @property
    def quantized_bits_per_param(self) -> float:
        """Bits per quantized parameter (codes and all scales), 0 if nothing is quantized."""
        if not self.quantized_params:
            return 0.0
        return 8 * self.bytes.get("base_quantized", 0) / self.quantized_params

    def __str__(self) -> str:
        lines = [
            f"trainable params: {self.trainable_params:,} / {self.total_params:,} "
            f"({100 * self.trainable_fraction:.4f}%)",
        ]
        for part, nbytes in self.bytes.items():
            lines.append(f"  {part:<16} {nbytes / 2**20:10.3f} MiB")
        lines.append(f"  {'total':<16} {self.total_bytes / 2**20:10.3f} MiB")
        if self.quantized_params:
            lines.append(f"  quantized base: {self.quantized_bits_per_param:.3f} bits/param")
        return "\n".join(lines)


def _part_of(name: str, owner_kinds: dict[str, str]) -> str:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in owner_kinds:
            kind = owner_kinds[prefix]
            if kind == "lora" and i < len(parts) and parts[i] in ADAPTER_STORES:
                return "adapters"
            if kind == "saved":
                return "modules_to_save"
    return "base_dense"


def summary(model: nn.Module, show: bool = False) -> Summary:
    """Count trainable/total parameters and bytes per part; print the table when ``show``."""
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALayer, ParamLoRA)):  # ParamLoRA: adapters on parameters
            kinds[name] = "lora"
        elif isinstance(module, ModulesToSave):
            kinds[name] = "saved"
        elif quantized_weight_of(module) is not None:
            kinds[name] = "quant"
    result = Summary(trainable_params=0, total_params=0)
    parts = {"adapters": 0, "modules_to_save": 0, "base_dense": 0, "base_quantized": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        result.total_params += param.numel()
        if param.requires_grad:
            result.trainable_params += param.numel()
        parts[_part_of(name, kinds)] += param.numel() * param.element_size()
    shared: set[tuple[int, ...]] = set()
    for name, module in model.named_modules():
        if kinds.get(name) != "quant":
            continue
        # A tied head may be its own module over the embedding's buffers: count those once.
        storage = tuple(id(b) for b in module.buffers(recurse=False))
        if storage in shared:
            continue
        shared.add(storage)
        qweight = module.qweight
        numel = 1
        for dim in qweight.shape:
            numel *= dim
        result.total_params += numel
        result.quantized_params += numel
        parts["base_quantized"] += qweight.nbytes
    result.bytes = {k: v for k, v in parts.items() if v}
    if show:
        print(result)
    return result
