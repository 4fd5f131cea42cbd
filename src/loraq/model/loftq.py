"""LoftQ over a whole model: quantize the frozen base layer by layer, each targeted layer with
the adapter that absorbs its quantization error (math in :mod:`loraq.layers.loftq`).

``loraq.apply(model, LoraConfig(quant="nf4", init="loftq", loftq_iters=5))`` calls
:func:`quantize_model_loftq`. Each dense Linear is quantized and, if it gets an adapter, refined
with LoftQ while its dense weight is at hand; then it is swapped for the quantized layer, so the
extra memory is a few copies of one layer, never a second copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers.kinds import is_gpt2_conv1d
from ..layers.loftq import loftq_decompose
from ..layers.protocol import QuantizedBase
from .config import QUANT_TYPES, LoraConfig
from .quantize import quantize_model

#: Attribute on the model holding ``{adapter_name: {layer name: LoftQLayerReport}}``.
REPORT_ATTR = "loraq_loftq_report"


@dataclass
class LoftQLayerReport:
    """LoftQ's result for one layer: the adapter factors and the relative errors.

    Attributes:
        a, b: the adapter factors (float32 or float64; None once copied into the adapter).
        plain_error: ``||W - Q(W)|| / ||W||``.
        errors: ``||W - (Q + s·B·A)|| / ||W||`` after each iteration. best_iteration: kept one.
    """

    a: torch.Tensor | None
    b: torch.Tensor | None
    plain_error: float
    errors: list[float]
    best_iteration: int

    @property
    def error(self) -> float:
        """Relative error of the kept iterate."""
        return self.errors[self.best_iteration - 1]


def check_loftq_targets(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """Raise ``ValueError`` naming the field if ``config`` cannot run LoftQ on ``targets``."""
    if config.quant is None:
        raise ValueError(
            "LoraConfig.init='loftq' needs a quantized base: set LoraConfig.quant to one of "
            f"{[q for q in QUANT_TYPES if q]} (LoftQ fits the adapter to the quantization error "
            "of the base)"
        )
    for name in targets:
        module = model.get_submodule(name)
        inner = getattr(module, "base_layer", module)
        if isinstance(inner, QuantizedBase):
            raise ValueError(
                f"LoraConfig.init='loftq' needs the dense weight of {name!r}, which is already "
                "quantized; apply LoftQ to the dense model (load a saved LoftQ base with "
                "loraq.load_quantized and its adapter with loraq.load_adapter)"
            )


@torch.no_grad()
def quantize_model_loftq(
    model: nn.Module, config: LoraConfig, targets: list[str]
) -> dict[str, LoftQLayerReport]:
    """Quantize ``model``'s base as :func:`~loraq.model.quantize.quantize_model` does, with the
    targeted Linear layers quantized by LoftQ; returns ``{layer name: report}``.

    Raises:
        ValueError: naming ``LoraConfig.init``/``quant`` without a quantized base or with an
            already-quantized target, ``LoraConfig.r`` above a layer's rank, or no targeted
            layer that gets quantized.
    """
    check_loftq_targets(model, config, targets)
    wanted = set(targets)
    reports: dict[str, LoftQLayerReport] = {}

    def refine(name: str, linear: nn.Linear, layer: nn.Module) -> None:
        if name not in wanted:
            return
        weight = linear.weight.t() if is_gpt2_conv1d(linear) else linear.weight
        rank_limit = min(weight.shape)
        if config.r > rank_limit:
            raise ValueError(
                f"LoraConfig.r={config.r} is above the rank of layer {name!r} "
                f"({tuple(weight.shape)}: at most {rank_limit}) for init='loftq'"
            )
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        latest: list[torch.Tensor] = []  # the last target quantized, what `layer` holds now

        def quantize(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if latest:  # the first target is W itself, which `layer` holds quantized already
                layer.set_weight(target)
            latest[:] = [target]
            return target, layer.dequantize_weight(work)

        result = loftq_decompose(
            weight, config.r, quantize, scaling=config.scaling, iters=config.loftq_iters
        )
        if result.stored is not latest[0]:  # quantization is deterministic: redo the best Q
            layer.set_weight(result.stored)
        latest.clear()
        reports[name] = LoftQLayerReport(
            result.a, result.b, result.plain_error, result.errors, result.best_iteration
        )

    quantize_model(model, config, adapted=targets, refine=refine)
    if not reports:
        raise ValueError(
            f"LoraConfig.init='loftq' found no targeted Linear layer that gets quantized "
            f"(targets {targets}); check LoraConfig.targets and LoraConfig.quant_skip"
        )
    return reports


def loftq_report(model: nn.Module, adapter_name: str = "default") -> dict[str, LoftQLayerReport]:
    """The per-layer LoftQ errors recorded when adapter ``adapter_name`` was applied."""
    found = getattr(model, REPORT_ATTR, {})
    if adapter_name not in found:
        raise ValueError(
            f"no LoftQ report for adapter {adapter_name!r}: it was not created with "
            "LoraConfig(init='loftq') in this process"
        )
    return found[adapter_name]
