"""Merging an adapter trained over a quantized base: three choices, each measured in output space.

An adapter trained with QLoRA learned to correct the *dequantized* base ``deq(Q)``, not the
original weights ``W``. So the choice of what to merge into decides what the merged model is:

=============  ==============================  ==============================================
``into``       merged weight                   what it costs
=============  ==============================  ==============================================
dequantized    ``deq(Q) + s·B·A`` (dense)       exact: the model that was trained; dense size
original       ``W + s·B·A`` (dense)            what PEFT does; needs ``W``; off by ``W - deq(Q)``
                                               (and by LoftQ's whole correction after LoftQ)
requantize     ``Q(deq(Q) + s·B·A)``            smallest file (same 4-/8-bit format); adds one
                                               more rounding of every adapted weight
=============  ==============================  ==============================================

:func:`loraq.unload` and :func:`loraq.export_merged` take the choice as ``merge_into``. Each
merge compares the merged model with the unmerged one on a small calibration batch and records a
:class:`MergeReport`: the largest absolute logit difference and the mean KL divergence from the
unmerged model's next-token (or class) distribution to the merged one's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..core.naming import unwrapped_name
from ..layers.lora import LoRALayer
from ..layers.protocol import LAYOUT_CONV1D, QuantizedBase
from ..layers.quantized import Embedding4bit
from ..quant.gguf_tensor import GGUFTensor
from ..quant.qtensor import QuantizedTensor
from .loftq import REPORT_ATTR as LOFTQ_REPORT_ATTR
from .quantize import dequantize_model

#: What an adapter can be merged into (``merge_into=``).
MERGE_TARGETS = ("dequantized", "original", "requantize")
#: Attribute on the merged model holding its :class:`MergeReport`.
REPORT_ATTR = "loraq_merge_report"
#: File next to a merged export holding its :class:`MergeReport` (JSON).
REPORT_FILE = "merge_report.json"
#: Shape of the default calibration batch (rows, tokens) of random token ids.
CALIBRATION_SHAPE = (4, 32)

#: Original weights as a model or a state dict.
Original = nn.Module | Mapping[str, torch.Tensor]


@dataclass
class MergeReport:
    """How far a merged model is from the unmerged one it came from.

    Attributes:
        into: the merge choice (one of :data:`MERGE_TARGETS`).
        max_logit_diff: largest absolute difference of the outputs (logits, or hidden states
            for a model without a head) on the calibration batch; None without a batch.
        kl: mean KL(unmerged || merged) in nats per position over the softmax of the logits;
            None without a batch or for a model without logits.
        max_weight_change: ``requantize`` only: the largest absolute change re-quantization
            made to a merged weight (0.0 otherwise).
        calibration: a description of the batch used ("" without one).
    """

    into: str
    max_logit_diff: float | None
    kl: float | None
    max_weight_change: float = 0.0
    calibration: str = ""

    @property
    def measured(self) -> bool:
        """True when a calibration batch measured the merge in output space."""
        return self.max_logit_diff is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON friendly)."""
        return asdict(self)

    def format(self) -> str:
        """One line for people."""
        parts = [f"merged into {self.into}"]
        if self.max_logit_diff is not None:
            parts.append(f"max |Δlogit| {self.max_logit_diff:.4g}")
        if self.kl is not None:
            parts.append(f"KL {self.kl:.3g} nats")
        if self.into == "requantize":
            parts.append(f"max |Δw| from re-quantization {self.max_weight_change:.3g}")
        if self.calibration:
            parts.append(f"on {self.calibration}")
        return ", ".join(parts)


def check_merge_target(into: str, original: Original | None) -> None:
    """Raise ``ValueError`` naming the argument for a bad choice or missing original weights."""
    if into not in MERGE_TARGETS:
        raise ValueError(f"merge_into={into!r} is invalid: expected one of {MERGE_TARGETS}")
    if into == "original" and original is None:
        raise ValueError(
            "merge_into='original' needs original= (the model or state dict holding the weights "
            "before quantization); merge_into='dequantized' is exact without them"
        )
    if into != "original" and original is not None:
        raise ValueError(f"original= is only used with merge_into='original', not {into!r}")


def has_quantized_base(model: nn.Module) -> bool:
    """True when ``model`` holds a quantized layer (a :class:`QuantizedBase` or 4-bit table)."""
    return bool(_quantized_names(model))


# ---------------------------------------------------------------------------------- calibration
def calibration_batch(model: nn.Module, batch: Any = None) -> tuple[Any, str]:
    """``(batch, description)``: the given batch, or random token ids when the model has a
    vocabulary (``config.vocab_size``), or ``(None, "")`` when neither is available."""
    if batch is not None:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else "given"
        return batch, f"calibration batch {shape}"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None, ""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, CALIBRATION_SHAPE, generator=generator)
    rows, tokens = CALIBRATION_SHAPE
    return ids, f"{rows}x{tokens} random token ids"


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_outputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, bool]:
    """``(outputs, are_logits)`` of ``model`` on ``batch`` (token ids, or a dict of inputs):
    the logits when the output has them, else the last hidden state (or the plain tensor)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), _eval_mode(model):
        if isinstance(batch, Mapping):
            out = model(**{k: v.to(device) for k, v in batch.items()})
        elif hasattr(model, "config"):
            out = model(input_ids=batch.to(device))
        else:
            out = model(batch.to(device))
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.float(), True
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden.float(), False
    if isinstance(out, torch.Tensor):
        return out.float(), True
    raise TypeError(f"cannot read logits from a {type(out).__name__} output")


def output_error(
    reference: torch.Tensor, merged: torch.Tensor, logits: bool
) -> tuple[float, float | None]:
    """``(max |merged - reference|, mean KL(reference || merged) or None)``."""
    diff = float((merged.double() - reference.double()).abs().max())
    if not logits:
        return diff, None
    ref = torch.log_softmax(reference.double(), dim=-1)
    new = torch.log_softmax(merged.double(), dim=-1)
    kl = (ref.exp() * (ref - new)).sum(-1).mean()
    return diff, float(kl.clamp_min(0))


@contextlib.contextmanager
def measured_merge(model: nn.Module, into: str, calibration: Any = None) -> Iterator[MergeReport]:
    """Run the merge inside the ``with`` block; the yielded :class:`MergeReport` gets the
    output-space numbers on exit and is set as ``model.loraq_merge_report``.

    The unmerged outputs are taken on entry, the merged ones on exit (the block fills in
    ``max_weight_change`` for a ``requantize`` merge). Without a ``calibration`` batch, a model
    whose forward does not take the default random token ids gets a report without output-space
    numbers rather than an error.
    """
    batch, description = calibration_batch(model, calibration)
    reference = None
    if batch is not None:
        try:
            reference, are_logits = model_outputs(model, batch)
        except Exception:
            if calibration is not None:
                raise
            description = ""  # the default batch does not fit this model's forward
    report = MergeReport(into, None, None, 0.0, description)
    yield report
    if reference is not None:
        merged, _ = model_outputs(model, batch)
        report.max_logit_diff, report.kl = output_error(reference, merged, are_logits)
    setattr(model, REPORT_ATTR, report)


# ---------------------------------------------------------------------------------- the base
def _quantized_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (QuantizedBase, Embedding4bit))
    ]


def _lookup(weights: Mapping[str, torch.Tensor], key: str, prefix: str) -> torch.Tensor | None:
    # A checkpoint of the bare model ("encoder.layer.0...") fits a model with a head, whose
    # names carry transformers' base_model_prefix ("bert.encoder.layer.0..."), and back.
    candidates = [key]
    if prefix and key.startswith(prefix + "."):
        candidates.append(key[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{key}")
    return next((weights[k] for k in candidates if k in weights), None)


def original_tensors(model: nn.Module, original: Original) -> dict[str, torch.Tensor]:
    """``{quantized layer name: its weight in original}``, every layer checked before anything
    changes (``ValueError`` naming the key): present, a dense floating tensor holding data (not
    on the meta device, not sparse), the dense shape, finite, and the weights the layer was
    quantized from (:func:`check_quantized_from`)."""
    weights = original.state_dict() if isinstance(original, nn.Module) else original
    prefix = getattr(model, "base_model_prefix", "")
    loftq = bool(getattr(model, LOFTQ_REPORT_ATTR, None))
    found: dict[str, torch.Tensor] = {}
    for name in _quantized_names(model):
        key = unwrapped_name(name) + ".weight"
        source = _lookup(weights, key, prefix)
        if source is None:
            raise ValueError(
                f"merge_into='original': original= has no tensor {key!r} for the quantized "
                "layer of that name"
            )
        _check_original_tensor(key, source)
        module = model.get_submodule(name)
        shape = _dense_shape(module)
        if tuple(source.shape) != shape:
            raise ValueError(
                f"merge_into='original': original tensor {key!r} has shape "
                f"{tuple(source.shape)}, the model's layer has {shape}"
            )
        if not loftq:  # LoftQ quantized W - A·B on purpose: its base is not Q(W)
            check_quantized_from(name, module, source)
        found[name] = source
    return found


def _check_original_tensor(key: str, source: object) -> None:
    if not isinstance(source, torch.Tensor):
        raise ValueError(
            f"merge_into='original': original {key!r} is a {type(source).__name__}, not a tensor"
        )
    if source.is_meta or source.layout != torch.strided:
        where = "on the meta device (no data)" if source.is_meta else f"{source.layout}"
        raise ValueError(
            f"merge_into='original': original tensor {key!r} is {where}; a dense tensor "
            "holding the weights is needed"
        )
    if not source.is_floating_point():
        raise ValueError(
            f"merge_into='original': original tensor {key!r} has dtype {source.dtype}; the "
            "float weights the base was quantized from are needed"
        )
    if not bool(torch.isfinite(source).all()):
        raise ValueError(f"merge_into='original': original tensor {key!r} holds NaN or Inf")


#: How many times the format's own rounding error (of the original, re-quantized) the stored base
#: may differ from the original's re-quantization. 0 for the very weights; a value on a rounding
#: boundary that went the other way (another device, another dtype) moves one code step, up to
#: twice the largest rounding error; weights of another model differ by 10x and more.
MATCH_SLACK = 3.0


def _requantized(module: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """``deq(Q(weight))`` with the settings ``module`` was quantized with, or None for a
    format loraq cannot produce (a k-quant read from a GGUF file)."""
    record = module.qweight
    weight = weight.to(device=record.device, dtype=record.dtype)
    try:
        if isinstance(module, QuantizedBase):
            fresh = module._quantize(weight)
        elif isinstance(record, GGUFTensor):
            fresh = GGUFTensor.from_tensor(weight, record.quant_type)
        else:
            fresh = QuantizedTensor.from_tensor(
                weight, record.blocksize, record.quant_type, record.double_quant
            )
    except (NotImplementedError, KeyError, ValueError):
        return None
    return fresh.dequantize(torch.float32)


@torch.no_grad()
def check_quantized_from(name: str, module: nn.Module, source: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless the quantized ``module`` is the quantization
    of ``source`` (its dense weight, as stored in the original) within the format's error.

    ``source`` is re-quantized with the module's own settings; the stored base may differ from
    that by at most :data:`MATCH_SLACK` times the largest rounding error the re-quantization made.
    Weights of another model with the same shapes differ by far more.
    """
    weight = source.detach()
    if isinstance(module, QuantizedBase) and module.dense_layout == LAYOUT_CONV1D:
        weight = weight.t()
    expected = _requantized(module, weight) if weight.numel() else None
    if expected is None:
        return
    stored = module.dequantize_weight(torch.float32).to(expected.device)
    dense = weight.to(device=expected.device, dtype=torch.float32)
    rounding = float((expected - dense).abs().max())
    # An original stored in lower precision than the weights quantized (bf16 vs float32) moves
    # every block's scale by up to that precision's relative rounding too.
    precision = torch.finfo(source.dtype).eps * float(dense.abs().max())
    tolerance = MATCH_SLACK * rounding + precision
    gap = float((stored - expected).abs().max())
    if gap > tolerance:
        raise ValueError(
            f"merge_into='original': the quantized layer {unwrapped_name(name)!r} is not a "
            f"quantization of the original's weights (they differ from its re-quantization by "
            f"up to {gap:.3g}, the format's error is {rounding:.3g}); pass the float model this "
            "base was made from"
        )


def check_dense_original(model: nn.Module, original: Original) -> None:
    """Raise ``ValueError`` naming the first adapted dense layer whose weight in ``original``
    differs from the model's own beyond float rounding (a merge onto another model's weights).

    A dense base is itself the weights the adapter trained on, so there ``original`` must equal
    it; a layer ``original`` does not hold is not checked (a dense merge does not need it). Call
    after any merged adapter was taken out of the base.
    """
    weights = original.state_dict() if isinstance(original, nn.Module) else original
    prefix = getattr(model, "base_model_prefix", "")
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALayer) or layer.is_quantized:
            continue
        key = unwrapped_name(name) + ".weight"
        source = _lookup(weights, key, prefix)
        if source is None:
            continue
        _check_original_tensor(key, source)
        base = layer.base_layer.weight.detach()
        if tuple(source.shape) != tuple(base.shape):
            raise ValueError(
                f"merge_into='original': original tensor {key!r} has shape "
                f"{tuple(source.shape)}, the model's layer has {tuple(base.shape)}"
            )
        dense = source.detach().to(device=base.device, dtype=torch.float32)
        coarser = max(torch.finfo(source.dtype).eps, torch.finfo(base.dtype).eps)
        tolerance = MATCH_SLACK * coarser * float(dense.abs().max()) if dense.numel() else 0.0
        gap = float((base.float() - dense).abs().max()) if dense.numel() else 0.0
        if gap > tolerance:
            raise ValueError(
                f"merge_into='original': the layer {unwrapped_name(name)!r} is not the "
                f"original's (its weights differ by up to {gap:.3g}); pass the model this "
                "adapter was trained on"
            )


def _dense_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, QuantizedBase):
        if module.dense_layout == LAYOUT_CONV1D:  # a GPT-2 Conv1D stores its weight (in, out)
            return (module.in_features, module.out_features)
        return (module.out_features, module.in_features)
    return tuple(module.qweight.shape)


@torch.no_grad()
def prepare_merge_base(
    model: nn.Module, into: str, original: Original | None, dtype: torch.dtype | None = None
) -> None:
    """Undo earlier merges and turn the base into the one ``into`` names, in place: dense
    dequantized weights, dense ``original`` weights, or the quantized base as it is. A dense
    base is cast to ``dtype`` when given. Bad input raises before the model changes."""
    check_merge_target(into, original)
    if into == "requantize" and not has_quantized_base(model):
        raise ValueError(
            "merge_into='requantize' needs a quantized base; this model has none "
            "(use merge_into='dequantized')"
        )
    restored = original_tensors(model, original) if into == "original" else {}
    for _, module in model.named_modules():
        if isinstance(module, LoRALayer):
            module.unmerge()  # merge afresh onto the chosen base
    if into == "original":
        check_dense_original(model, original)
    if into == "requantize":
        return
    dequantize_model(model, dtype)
    for name, source in restored.items():
        target = model.get_submodule(name).weight
        target.copy_(source.to(device=target.device, dtype=target.dtype))
    if dtype is not None and {p.dtype for p in model.parameters() if p.is_floating_point()} - {
        dtype
    }:
        model.to(dtype)
